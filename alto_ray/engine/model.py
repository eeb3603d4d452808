"""Backbone loading and multi-LoRA injection: one frozen model, adapters added and removed live."""
from __future__ import annotations

import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import DEFAULT_TARGET_MODULES, AdapterConfig
from .lora import BatchLayout, LoRARuntime, LoRASlot, MultiLoRALinear
from .fused_modules import fuse_gated_mlps, fuse_rms_norms, fuse_rotary, rotary_scope
from .siblings import group_sibling_linears


def looks_like_local_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a separator is a path."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
            or model.count("/") > 1 or os.sep != "/" and os.sep in model)


def check_model_source(model: str) -> str:
    """Fail fast (before any weight loads) on a local path that is not there."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a local path, a hub id or an nn.Module, got {model!r}")
    if looks_like_local_path(model):
        path = os.path.expanduser(model)
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"model={model!r}: no such local model directory (config.json missing)")
        return path
    return model


def load_backbone(model: str, device: Union[str, torch.device] = "cpu",
                  dtype: Optional[torch.dtype] = None, attn_implementation: str = "sdpa") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` onto ``device`` in ``dtype``, frozen, in eval mode
    (HF dropout off: only LoRA dropout is part of the recipe)."""
    from transformers import AutoModelForCausalLM

    source = check_model_source(model)
    kwargs = {}
    if torch.device(device).type != "cpu" and _has_accelerate():  # load straight onto the GPU
        kwargs["device_map"] = {"": str(torch.device(device))}
    try:
        backbone = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype if dtype is not None else "auto",
            attn_implementation=attn_implementation, **kwargs)
    except OSError as exc:
        raise ValueError(f"model={model!r} could not be loaded: {exc}") from exc
    return freeze(backbone.to(device))


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def freeze(backbone: nn.Module) -> nn.Module:
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    if hasattr(backbone, "config") and hasattr(backbone.config, "use_cache"):
        backbone.config.use_cache = False
    return backbone


@dataclass(frozen=True)
class LoRAEntry:
    """One targeted module of one adapter: where its A and B sit in the adapter's flat master."""

    module_name: str
    rank: int
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int


@dataclass(frozen=True)
class LoRABlock:
    """Same-shaped modules (e.g. every layer's q_proj) stored back to back, so one view +
    ``unbind`` yields all their A (or B) matrices: a few ops per adapter per step, not 2 per layer."""

    entry_indices: Tuple[int, ...]
    a_shape: Tuple[int, int, int]  # [n, r, in]
    b_shape: Tuple[int, int, int]  # [n, out, r]


class AdapterWeights:
    """An adapter's LoRA weights across all its layers as ONE flat fp32 parameter.

    One tensor per adapter makes the per-step fp32→bf16 cast one op, its optimizer one
    parameter, its grad norm one reduction, and its checkpoint one tensor.
    """

    def __init__(self, name: str, cfg: AdapterConfig, slot: int, entries: List[LoRAEntry],
                 blocks: List[LoRABlock], master: nn.Parameter) -> None:
        self.name, self.cfg, self.slot, self.master = name, cfg, slot, master
        self.entries, self.blocks = entries, blocks
        self._sink: Optional[Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]] = None
        self.block_sizes: List[int] = []
        for blk in blocks:
            self.block_sizes += [math.prod(blk.a_shape), math.prod(blk.b_shape)]

    def sink_pieces(self, dtype: torch.dtype) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """For the fused kernels' gradient sink: ``[A_0, B_0, ...]`` as views of a persistent
        compute-dtype copy of the master (refreshed in place here, so addresses never change and
        the kernels' pointer tables stay valid), and the matching views of ``master.grad``
        (a persistent fp32 buffer the kernels add into; zero it, do not set it to None)."""
        if self._sink is None or self._sink[0].dtype != dtype:
            m = self.master
            compute = m.detach() if m.dtype == dtype else torch.empty(m.shape, dtype=dtype, device=m.device)
            if m.grad is None:
                m.grad = torch.zeros_like(m)
            self._sink = (compute, self._views(compute), self._views(m.grad))
        compute, views, grads = self._sink
        if compute.data_ptr() != self.master.data_ptr():
            with torch.no_grad():
                compute.copy_(self.master)
        if self.master.grad is None or self.master.grad.data_ptr() != grads[0].data_ptr():
            raise RuntimeError(f"adapter {self.name!r}: its gradient sink was replaced (zero_grad(set_to_none=True)?)")
        return views, grads

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        pieces: List[torch.Tensor] = []
        for e in self.entries:
            pieces.append(flat[e.a_offset:e.a_offset + e.rank * e.in_features].view(e.rank, e.in_features))
            pieces.append(flat[e.b_offset:e.b_offset + e.out_features * e.rank].view(e.out_features, e.rank))
        return pieces

    def compute_pieces(self, dtype: torch.dtype) -> List[torch.Tensor]:
        """Differentiable cast + split: ``[A_0, B_0, A_1, B_1, ...]`` in entry order, 2-D."""
        w = self.master if self.master.dtype == dtype else self.master.to(dtype)
        chunks = torch.split(w, self.block_sizes)  # one autograd node: its backward is one cat
        pieces: List[torch.Tensor] = [w] * (2 * len(self.entries))
        for g, blk in enumerate(self.blocks):
            for i, a in zip(blk.entry_indices, chunks[2 * g].view(blk.a_shape).unbind(0)):
                pieces[2 * i] = a
            for i, b in zip(blk.entry_indices, chunks[2 * g + 1].view(blk.b_shape).unbind(0)):
                pieces[2 * i + 1] = b
        return pieces

    def lora_pairs(self) -> Iterator[Tuple[LoRAEntry, torch.Tensor, torch.Tensor]]:
        """(entry, A [r, in], B [out, r]) as detached fp32 views of the master."""
        flat = self.master.detach()
        for e in self.entries:
            yield (e, flat[e.a_offset:e.a_offset + e.rank * e.in_features].view(e.rank, e.in_features),
                   flat[e.b_offset:e.b_offset + e.out_features * e.rank].view(e.out_features, e.rank))


def lora_layout(modules: Sequence[Tuple[str, nn.Module]], rank: int) -> Tuple[List[LoRAEntry], List[LoRABlock], int]:
    """Entries (in module order) and blocks (grouped by module kind and shape); total size."""
    groups: Dict[Tuple[str, int, int], List[int]] = {}
    for i, (name, m) in enumerate(modules):
        groups.setdefault((name.rsplit(".", 1)[-1], m.in_features, m.out_features), []).append(i)
    entries: List[Optional[LoRAEntry]] = [None] * len(modules)
    blocks: List[LoRABlock] = []
    offset = 0
    for (_, fin, fout), idxs in groups.items():
        n = len(idxs)
        a_start, b_start = offset, offset + n * rank * fin
        offset = b_start + n * fout * rank
        for k, i in enumerate(idxs):
            entries[i] = LoRAEntry(modules[i][0], rank, fin, fout, a_start + k * rank * fin, b_start + k * fout * rank)
        blocks.append(LoRABlock(tuple(idxs), (n, rank, fin), (n, fout, rank)))
    return [e for e in entries if e is not None], blocks, offset


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def attention_backends(device: torch.device) -> list:
    """SDPA backends for the engine's forwards on ``device`` (empty: PyTorch's choice).

    On GPUs cuDNN attention is left out (``ALTO_SDPA_SKIP_CUDNN=0`` keeps it): it builds a plan
    and compiles kernels for every new sequence length, 120-160 ms each on an H100 (seconds on a
    cold machine), and a grouped step's padded width changes from batch to batch. FlashAttention
    and the memory-efficient kernel are precompiled (<1 ms for a new width).
    """
    if device.type != "cuda" or os.environ.get("ALTO_SDPA_SKIP_CUDNN", "1").strip().lower() in ("0", "false", "no"):
        return []
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class MultiLoRAModel(nn.Module):
    """A frozen causal LM whose target linears are ``MultiLoRALinear``; adapters by name."""

    def __init__(self, backbone: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
                 backend: str = "auto") -> None:
        super().__init__()
        self.backbone = freeze(backbone)
        self.runtime = LoRARuntime(backend)
        self.lora_layers: Dict[str, MultiLoRALinear] = {}
        self.adapters: Dict[str, AdapterWeights] = {}
        self.wrap_targets(target_modules)
        self.fused_norms = fuse_rms_norms(self.backbone, self.runtime)
        self.fused_mlps = fuse_gated_mlps(self.backbone, self.runtime)
        self.fused_rotary = fuse_rotary(self.backbone)
        self._stream_table: Optional[torch.Tensor] = None  # dropout streams by slot (load_streams)
        self._stream_values: Dict[int, int] = {}

    # -- injection -------------------------------------------------------------------------
    def wrap_targets(self, target_modules: Sequence[str]) -> None:
        """Replace every ``nn.Linear`` whose name ends in a target with a ``MultiLoRALinear``
        (idempotent; other adapters are untouched). An unmatched target is a config error."""
        missing = []
        for target in target_modules:
            found = False
            for name, module in list(self.backbone.named_modules()):
                if not _matches(name, target):
                    continue
                if isinstance(module, MultiLoRALinear):
                    found = True
                elif isinstance(module, nn.Linear):
                    self._replace(name, MultiLoRALinear(module, self.runtime, len(self.lora_layers)))
                    found = True
            if not found:
                missing.append(target)
        if missing:
            raise ValueError(f"target_modules: no nn.Linear in {type(self.backbone).__name__} matches "
                             f"{missing}")
        self.sibling_groups = group_sibling_linears(self.backbone)

    def _replace(self, name: str, new: MultiLoRALinear) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
        setattr(parent, child, new)
        self.lora_layers[name] = new

    def modules_for(self, target_modules: Sequence[str]) -> List[Tuple[str, MultiLoRALinear]]:
        self.wrap_targets(target_modules)
        return [(n, m) for n, m in self.lora_layers.items() if any(_matches(n, t) for t in target_modules)]

    # -- adapters ----------------------------------------------------------------------------
    def free_slot(self) -> int:
        taken = {a.slot for a in self.adapters.values()}
        return next(i for i in range(len(taken) + 1) if i not in taken)

    def add_adapter(self, name: str, cfg: AdapterConfig) -> AdapterWeights:
        """Create the adapter's flat master (PEFT init, seeded by ``cfg.seed``) and register a
        slot in each of its target layers."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        modules = self.modules_for(cfg.target_modules)
        entries, blocks, size = lora_layout(modules, cfg.rank)
        flat = torch.zeros(size, dtype=torch.float32)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        for e in entries:  # A: kaiming_uniform(a=√5) as PEFT, in module order; B: zeros
            nn.init.kaiming_uniform_(flat[e.a_offset:e.a_offset + e.rank * e.in_features].view(e.rank, e.in_features),
                                     a=math.sqrt(5), generator=gen)
        device = self.backbone_device()
        master = nn.Parameter(flat.to(device))
        slot = self.free_slot()
        weights = AdapterWeights(name, cfg, slot, entries, blocks, master)
        for i, (mname, m) in enumerate(modules):
            m.add_slot(slot, LoRASlot(name, cfg.rank, cfg.scale, float(cfg.dropout), piece=i,
                                      seq_stride=int(cfg.max_seq_len)))
        self.adapters[name] = weights
        return weights

    def remove_adapter(self, name: str) -> None:
        weights = self.adapters.pop(name)
        for m in self.lora_layers.values():
            if weights.slot in m.slots and m.slots[weights.slot].name == name:
                m.remove_slot(weights.slot)

    def backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.lora_layers.values())).base.weight.dtype

    # -- per-step context ----------------------------------------------------------------------
    def kernel_plans(self) -> List[object]:
        """Every LoRA layer's cached kernel plans (their device tables: what a captured step reads)."""
        return [plan for layer in self.lora_layers.values() for plan in layer.cached_plans()]

    def load_streams(self, streams: Dict[str, int]) -> torch.Tensor:
        """Write the adapters' dropout streams into the persistent device table (by slot) and
        return it. The table keeps its address (a captured step reads it at replay), and a
        write of the values it already holds is skipped: the capture of a step whose streams
        were loaded just before it records no copy from host memory that is gone at replay."""
        values = {self.adapters[n].slot: int(v) % 2 ** 31 for n, v in streams.items()}
        need = max(values) + 1
        table = self._stream_table
        device = self.backbone_device()
        if table is None or table.numel() < need or table.device != device:
            table = self._stream_table = torch.zeros(max(64, 2 * need), dtype=torch.int64, device=device)
            self._stream_values = {}
        if any(self._stream_values.get(k) != v for k, v in values.items()):
            host = torch.zeros(table.numel(), dtype=torch.int64)
            merged = {**self._stream_values, **values}
            for slot, v in merged.items():
                host[slot] = v
            table.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
            self._stream_values = merged
        return table

    @contextmanager
    def batch(self, layout: Sequence[Tuple[str, int, int]], total_rows: int, training: bool,
              seed: int = 0, streams: Optional[Dict[str, int]] = None,
              width: Optional[int] = None) -> Iterator[Dict[str, List[torch.Tensor]]]:
        """Set the row layout ``[(adapter, lo, hi)]`` and cast weights for one forward(+backward).

        Dropout: with ``streams`` (adapter -> its own stream number, e.g. from its seed and
        micro-step) and ``width`` (rows per packed sequence), an adapter's masks depend on
        nothing else in the batch; otherwise they come from ``seed`` and the batch layout.

        Yields the per-adapter pieces (compute dtype) so callers can see what the layers use.
        With the fused kernels (a GPU) the pieces are constants and the kernels add the LoRA
        gradients straight into each adapter's ``master.grad`` (its gradient sink); on the
        reference path they are differentiable views of the master.
        """
        rt = self.runtime
        dtype = self.compute_dtype()
        rt.layout = BatchLayout(slots=tuple(self.adapters[n].slot for n, _, _ in layout),
                                row_ranges=tuple((lo, hi) for _, lo, hi in layout), total_rows=total_rows)
        if rt.use_grad_sink(self.backbone_device()):
            sinks = {n: self.adapters[n].sink_pieces(dtype) for n, _, _ in layout}
            pieces = {n: views for n, (views, _) in sinks.items()}
            rt.grads = {self.adapters[n].slot: g for n, (_, g) in sinks.items()}
        else:
            pieces = {n: self.adapters[n].compute_pieces(dtype) for n, _, _ in layout}
        rt.weights = {self.adapters[n].slot: p for n, p in pieces.items()}
        rt.training, rt.seed = training, seed
        if streams is not None and training:
            rt.streams = self.load_streams({n: streams[n] for n, _, _ in layout})
            rt.stream_values = {self.adapters[n].slot: int(streams[n]) % 2 ** 31 for n, _, _ in layout}
            rt.width = width
        try:
            with ExitStack() as scopes:
                if self.fused_rotary:
                    scopes.enter_context(rotary_scope(rt))
                backends = attention_backends(self.backbone_device())
                if backends:
                    scopes.enter_context(sdpa_kernel(backends))
                yield pieces
        finally:
            rt.clear()

