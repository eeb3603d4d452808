"""``MultiLoRALinear``: one frozen ``nn.Linear`` plus any number of LoRA adapters, applied per row.

The packed batch holds every adapter's sequences contiguously, so in the flattened ``[B*L]``
tokens adapter ``i`` owns one row range. Every wrapped linear of a model shares one
``LoRARuntime`` that the trainer fills once per micro-step (row layout + each adapter's weights
already cast to the compute dtype), so a layer's forward does no per-call bookkeeping beyond
picking its own adapters' views; segment tables are built once per step per distinct set of
adapters (usually one set: every adapter targets every wrapped module).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import alto_kernels


@dataclass(frozen=True)
class SegmentRun:
    """A contiguous block of rows ``[lo, hi)`` whose adapters are all present in some layer."""

    lo: int
    hi: int
    slots: Tuple[int, ...]
    offsets: Tuple[int, ...]  # relative to ``lo``; len(slots) + 1 entries


@dataclass
class BatchLayout:
    """Which adapter slot owns which rows of the flattened batch, in packed order."""

    slots: Tuple[int, ...]
    row_ranges: Tuple[Tuple[int, int], ...]
    total_rows: int
    _runs: Dict[Tuple[int, ...], Tuple[SegmentRun, ...]] = field(default_factory=dict, repr=False)

    def runs_for(self, present: frozenset) -> Tuple[SegmentRun, ...]:
        """Maximal runs of consecutive packed adapters that are in ``present``; rows of
        adapters not in the layer fall between runs and get no delta. Cached per set."""
        key = tuple(sorted(present))
        cached = self._runs.get(key)
        if cached is not None:
            return cached
        runs: List[SegmentRun] = []
        cur_slots: List[int] = []
        cur_bounds: List[int] = []
        for slot, (lo, hi) in zip(self.slots, self.row_ranges):
            if slot in present and hi > lo:
                if cur_slots and cur_bounds[-1] != lo:  # not adjacent: close the run
                    runs.append(_make_run(cur_slots, cur_bounds))
                    cur_slots, cur_bounds = [], []
                if not cur_slots:
                    cur_bounds.append(lo)
                cur_slots.append(slot)
                cur_bounds.append(hi)
            elif cur_slots:
                runs.append(_make_run(cur_slots, cur_bounds))
                cur_slots, cur_bounds = [], []
        if cur_slots:
            runs.append(_make_run(cur_slots, cur_bounds))
        self._runs[key] = tuple(runs)
        return self._runs[key]


def _make_run(slots: List[int], bounds: List[int]) -> SegmentRun:
    lo = bounds[0]
    return SegmentRun(lo=lo, hi=bounds[-1], slots=tuple(slots), offsets=tuple(b - lo for b in bounds))


class LoRARuntime:
    """Per-step state shared by all wrapped linears of one model (a context, not call args).

    ``grad_sink`` (default: on wherever the fused kernels run; ``ALTO_GRAD_SINK=0`` turns it
    off) makes the kernels add LoRA gradients straight into each adapter's fp32 ``master.grad``
    instead of returning 2 tensors per adapter per layer through autograd.
    """

    def __init__(self, backend: str = "auto", grad_sink: Optional[bool] = None) -> None:
        self.backend = backend
        self.grad_sink = grad_sink if grad_sink is not None else os.environ.get("ALTO_GRAD_SINK", "1") != "0"
        self.layout: Optional[BatchLayout] = None
        self.weights: Dict[int, Sequence[torch.Tensor]] = {}  # slot -> [A_0, B_0, A_1, ...] (compute dtype)
        self.grads: Dict[int, Sequence[torch.Tensor]] = {}    # slot -> fp32 sinks like weights (sink mode)
        self.training = False
        self.seed = 0
        # Dropout identity (fused kernels): a device int64 table indexed by slot whose entries
        # come from each adapter's own seed and micro-step, and the rows per packed sequence.
        # With them an adapter's masks do not depend on which adapters share its batch.
        self.streams: Optional[torch.Tensor] = None
        self.stream_values: Optional[Dict[int, int]] = None  # the same, on the host (other paths)
        self.width: Optional[int] = None
        self._fused_on: Dict[torch.device, bool] = {}

    def use_grad_sink(self, device: torch.device) -> bool:
        return self.grad_sink and self.uses_triton(device)

    def uses_triton(self, device: torch.device) -> bool:
        """Whether this model's Triton kernels run on ``device`` (cached: asked every layer call)."""
        on = self._fused_on.get(device)
        if on is None:
            on = self._fused_on[device] = alto_kernels.resolve_backend(
                torch.empty(0, device=device), self.backend) == "triton"
        return on

    def clear(self) -> None:
        self.layout = None
        self.weights = {}
        self.grads = {}
        self.streams = None
        self.stream_values = None
        self.width = None


@dataclass
class LoRASlot:
    """One adapter inside one layer: which of the adapter's per-step pieces are its A and B."""

    name: str
    rank: int
    scale: float
    dropout: float
    piece: int  # the adapter's entry index: A is pieces[2 * piece], B is pieces[2 * piece + 1]
    seq_stride: int = 0  # the adapter's longest sequence: the stride of its dropout positions


class MultiLoRALinear(nn.Module):
    """A frozen linear whose output gets ``scale_i * dropout(x) A_iᵀ B_iᵀ`` on adapter i's rows.

    Adapters live in numbered slots (the model-wide slot id of the adapter); adding or removing
    one touches only its slot, and a freed slot is reused by the next adapter. The LoRA weights
    themselves are views of the adapter's flat fp32 master (see ``AdapterWeights``), handed in
    per step through the runtime so that the fp32→compute-dtype cast happens once per adapter.
    """

    def __init__(self, base: nn.Linear, runtime: LoRARuntime, layer_index: int = 0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.layer_index = layer_index  # varies the dropout seed between layers
        object.__setattr__(self, "runtime", runtime)  # shared, not a submodule
        # The base GEMM inside the fused node (sink mode): for a frozen weight that is a plain
        # tensor at the call (a sharded one is too inside its FSDP unit's forward, which gathers
        # it onto ``base``), ALTO_FUSED_LINEAR=0 off.
        self._fused_linear = (os.environ.get("ALTO_FUSED_LINEAR", "1").strip().lower() not in ("0", "false", "no")
                              and not base.weight.requires_grad)
        # ...and in it the base GEMMs add into the LoRA deltas (ALTO_LINEAR_EPILOGUE=0: the reverse)
        self._linear_epilogue = os.environ.get("ALTO_LINEAR_EPILOGUE", "1").strip().lower() not in ("0", "false", "no")
        # ...or the base GEMMs are alto's own with the LoRA expand in their epilogue (lora_gemm;
        # Hopper, no bias): ALTO_LINEAR_GEMM=1
        self._linear_gemm = os.environ.get("ALTO_LINEAR_GEMM", "0").strip().lower() in ("1", "true", "yes")
        self.slots: Dict[int, LoRASlot] = {}
        # Set by ``siblings.group_sibling_linears``: the q/k/v or gate/up group this layer is in.
        object.__setattr__(self, "sibling_group", None)
        self._slots_changed()

    @property
    def weight(self) -> torch.Tensor:  # code that inspects ``module.weight`` keeps working
        return self.base.weight

    def add_slot(self, slot: int, slot_info: LoRASlot) -> None:
        if slot in self.slots:
            raise ValueError(f"slot {slot} is already taken by adapter {self.slots[slot].name!r}")
        self.slots[slot] = slot_info
        self._slots_changed()

    def remove_slot(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._slots_changed()

    def _slots_changed(self) -> None:
        self._present = frozenset(self.slots)
        self._any_dropout = any(info.dropout > 0 for info in self.slots.values())
        self._static: Dict[Tuple[int, ...], tuple] = {}
        self._plans: Dict[tuple, object] = {}  # fused-kernel plans of this layer (sink mode)

    def cached_plans(self) -> List[object]:
        return list(self._plans.values())

    def _run_static(self, slots: Tuple[int, ...]) -> tuple:
        """Per-run constants (piece indices, scales, dropout), cached until membership changes."""
        cached = self._static.get(slots)
        if cached is None:
            infos = [self.slots[s] for s in slots]
            cached = ([(s, 2 * i.piece) for s, i in zip(slots, infos)], [i.scale for i in infos],
                      [i.dropout for i in infos])
            self._static[slots] = cached
        return cached

    def extra_repr(self) -> str:
        names = ", ".join(f"{s}:{info.name}(r={info.rank})" for s, info in sorted(self.slots.items()))
        return f"in={self.in_features}, out={self.out_features}, adapters=[{names}]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        layout = rt.layout
        if layout is None or not self._present:
            return self.base(x)
        runs = layout.runs_for(self._present)
        if not runs:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != layout.total_rows:
            raise RuntimeError(f"batch layout covers {layout.total_rows} rows but the layer got {x2.shape[0]}")
        use_dropout, seed = self._dropout_seed()
        node = self._one_node(x2, runs, use_dropout, seed)
        if node is not None:
            # Every row is some adapter's: the base GEMM and the deltas as one autograd node
            # whose backward adds the LoRA dX into the base's (no separate add); with siblings
            # (q/k/v, gate/up of one input: ``siblings.SiblingGroup``) one node for all of them.
            group = self.sibling_group
            y = group.output(self, x, x2) if group is not None else None
            if y is None:
                plan, seed, streams = node
                y = alto_kernels.apply_linear_multi_lora(plan, x2, self.base.weight, self.base.bias, seed, **streams,
                                                         epilogue=self._linear_epilogue, gemm=self._linear_gemm)
            return y.view(*x.shape[:-1], self.out_features)
        # The base GEMM on 2-D rows gives a fresh tensor, not a view: the fused kernel adds the
        # delta into ``base_out`` in place, and an in-place op on a view of another op's output
        # breaks its backward (autograd's CopySlices).
        o2 = self.base(x2)
        pieces: List[torch.Tensor] = []
        cursor = 0
        for run in runs:
            where, scales, drops = self._run_static(run.slots)
            full = run.lo == 0 and run.hi == o2.shape[0]
            if run.lo > cursor:
                pieces.append(o2[cursor:run.lo])
            xs = x2 if full else x2[run.lo:run.hi]
            base_rows = o2 if full else o2[run.lo:run.hi].clone()  # a slice is a view: see above
            if rt.grads:
                pieces.append(self._sink_call(run, where, scales, drops, use_dropout, xs, base_rows, seed))
                cursor = run.hi
                continue
            a_list = [rt.weights[slot][k] for slot, k in where]
            b_list = [rt.weights[slot][k + 1] for slot, k in where]
            own = {}
            if use_dropout and rt.stream_values is not None:
                own = dict(streams=[rt.stream_values[slot] for slot, _ in where], width=rt.width,
                           seq_strides=[self.slots[slot].seq_stride for slot, _ in where])
            pieces.append(alto_kernels.multi_lora(
                xs, base_rows, a_list, b_list, list(run.offsets), scales,
                dropout_p=drops if use_dropout else None, training=use_dropout, seed=seed,
                backend=rt.backend, **own))
            cursor = run.hi
        if cursor < o2.shape[0]:
            pieces.append(o2[cursor:])
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return y.view(*x.shape[:-1], self.out_features)

    def _dropout_seed(self) -> Tuple[bool, int]:
        """Whether this call draws dropout masks, and the layer's seed for them. Per-layer seeds
        only when a mask is drawn: a constant seed lets the kernel reuse its cached segment table
        across layers and steps."""
        rt = self.runtime
        use_dropout = rt.training and self._any_dropout
        if rt.stream_values is not None:  # per-adapter streams carry the step: the seed names the layer
            return use_dropout, (self.layer_index * 1009 + 1) if use_dropout else 0
        return use_dropout, (rt.seed * 1009 + self.layer_index) % (2 ** 31) if use_dropout else 0

    def _one_node(self, x2: torch.Tensor, runs: Tuple[SegmentRun, ...], use_dropout: bool,
                  seed: int) -> Optional[tuple]:
        """``(plan, seed, streams)`` for the one-node linear (gradient sinks on, one run covering
        every row, a frozen plain weight), else None."""
        rt = self.runtime
        weight = self.base.weight
        if not (rt.grads and self._fused_linear and len(runs) == 1 and runs[0].lo == 0
                and runs[0].hi == x2.shape[0] and not weight.requires_grad and type(weight.data) is torch.Tensor):
            return None
        run = runs[0]
        where, scales, drops = self._run_static(run.slots)
        plan = self._sink_plan(run, where, scales, drops, use_dropout, x2)
        streams = (dict(streams=rt.streams, width=rt.width) if use_dropout and rt.streams is not None else {})
        return plan, seed, streams

    def one_node_call(self, x2: torch.Tensor) -> Optional[tuple]:
        """The one-node arguments of a call on ``x2`` now (``_one_node``), for a sibling group;
        None where this layer would take another path."""
        layout = self.runtime.layout
        if layout is None or not self._present:
            return None
        runs = layout.runs_for(self._present)
        if not runs:
            return None
        use_dropout, seed = self._dropout_seed()
        return self._one_node(x2, runs, use_dropout, seed)

    def _sink_plan(self, run: SegmentRun, where, scales, drops, use_dropout: bool, xs: torch.Tensor):
        """This layer's cached plan for ``run`` with the adapters' gradient sinks (validation and
        tables paid once per row layout, not per call)."""
        key = (run.slots, run.offsets, use_dropout, xs.dtype)
        plan = self._plans.get(key)
        if plan is None:
            rt = self.runtime
            if len(self._plans) >= 64:  # row layouts vary with padding width: keep a bounded few
                self._plans.clear()
            out_like = xs.new_empty(1, self.out_features).expand(xs.shape[0], self.out_features)
            plan = self._plans[key] = alto_kernels.prepare_multi_lora(
                xs, out_like, [rt.weights[s][k] for s, k in where], [rt.weights[s][k + 1] for s, k in where],
                list(run.offsets), scales, dropout_p=drops if use_dropout else None, training=use_dropout,
                grad_a=[rt.grads[s][k] for s, k in where], grad_b=[rt.grads[s][k + 1] for s, k in where],
                stream_index=[s for s, _ in where], seq_strides=[self.slots[s].seq_stride for s, _ in where])
        return plan

    def _sink_call(self, run: SegmentRun, where, scales, drops, use_dropout: bool, xs: torch.Tensor,
                   base_rows: torch.Tensor, seed: int) -> torch.Tensor:
        """The fused kernels on the base's output rows, with this layer's cached plan."""
        plan = self._sink_plan(run, where, scales, drops, use_dropout, xs)
        rt = self.runtime
        if use_dropout and rt.streams is not None:
            return alto_kernels.apply_multi_lora(plan, xs, base_rows, seed, streams=rt.streams, width=rt.width)
        return alto_kernels.apply_multi_lora(plan, xs, base_rows, seed)
