"""``GroupedTrainer``: every adapter's micro-batch in one packed batch, one forward, one backward.

Why one backward over the sum of per-adapter mean-token losses gives each adapter exactly its
own gradient: no op mixes rows of different sequences (each sequence is its own batch row, LoRA
deltas are per segment, the loss is gathered per adapter), so ∂(Σ_j L_j)/∂θ_i = ∂L_i/∂θ_i.

Gradient accumulation policy (adapters may differ): a step runs ``max(grad_accum)`` micro-steps;
adapter i takes part in the first ``grad_accum_i`` of them with loss ``L_i / grad_accum_i`` and
sits out the rest; after the last micro-step every adapter clips and steps once. So ``step()`` is
always one optimizer step of every adapter, the same as a PEFT loop with that adapter's accum.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import alto_kernels
import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_TARGET_MODULES, AdapterConfig, lr_at
from .data import (AdapterStream, DatasetSpec, Example, PackedBatch, TaskData, load_records, pack_batch,
                   to_device)
from .gc_pause import gc_paused, pause_gc_default
from .graphs import StepGraphs
from .memory import fused_loss_enabled
from .model import AdapterWeights, MultiLoRAModel, check_model_source, freeze, load_backbone

logger = logging.getLogger(__name__)

# With CUDA graphs on: batch widths round up to a multiple of 64 tokens and loss positions to
# one of 4 sizes per width, so a group on data of varying lengths meets a handful of shapes;
# up to 8 captured shapes are kept (they share one memory pool: about one step's activations).
GRAPH_WIDTH_MULTIPLE, GRAPH_LOSS_BUCKETS, GRAPH_MAX_SHAPES = 64, 4, 8

STATE_FORMAT = "alto-ray/adapter-state/1"
# Architectures whose logits are exactly lm_head(final hidden): the loss can skip positions
# without a label. Others (soft-capping, logit scaling, ...) go through the model's own logits.
_PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "mixtral",
                           "qwen2_moe", "qwen3_moe", "starcoder2", "stablelm", "gpt_neox"}


@dataclass
class StepResult:
    """One optimizer step of one adapter.

    ``step``: the adapter's step count after this call, 1-based (a skipped non-finite step still
    counts: its data and schedule move on); ``loss``: mean token loss over the step's
    micro-batches; ``tokens``: non-pad input tokens consumed; ``lr``: the rate of this step;
    ``grad_norm``: before clipping; ``finite``: False when loss or gradient was NaN/inf and the
    optimizer step was skipped."""

    step: int
    loss: float
    tokens: int
    lr: float
    grad_norm: float
    finite: bool


class _AdapterRun:
    """Trainer-side state of one adapter: weights, optimizer, data stream, step count."""

    def __init__(self, weights: AdapterWeights, stream: AdapterStream) -> None:
        cfg = weights.cfg
        self.name, self.cfg, self.weights, self.stream = weights.name, cfg, weights, stream
        extra = {"fused": True} if weights.master.is_cuda else {}
        self.optimizer = torch.optim.AdamW([weights.master], lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay, eps=1e-8, **extra)
        self.step = 0
        self.micro_steps = 0  # micro-batches trained: with the seed, names its dropout masks

    def dropout_stream(self) -> int:
        """This micro-batch's dropout stream: from the adapter's own seed and micro-step only, so
        its masks are the same whichever adapters share the group (or joined before it)."""
        z = (int(self.cfg.seed) * 0x9E3779B97F4A7C15 + (self.micro_steps + 1) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0x94D049BB133111EB) % 2 ** 64
        return (z ^ (z >> 31)) % 2 ** 31


class GroupedTrainer:
    """Trains many LoRA adapters of one frozen backbone together (see module docstring).

    ``dataset`` is a ``DatasetSpec`` (tokenised with the backbone's tokenizer, or ``tokenizer``)
    or a ready ``TaskData``. ``eval_size`` caps the held-out examples that ``evaluate`` uses.
    ``cuda_graphs`` (default: ``ALTO_CUDA_GRAPHS``, off) replays each micro-step whose batch shape
    repeats as one CUDA graph (``graphs.py``): for models small enough that the step is
    host-bound; it keeps the step's activation memory reserved between steps.
    ``pause_gc`` (default: ``ALTO_PAUSE_GC``, on) holds Python's cyclic collector off during
    ``step`` and ``evaluate``, so that no collection lands mid-step (``gc_pause.py``).
    """

    def __init__(self, model: Union[str, nn.Module], dataset: Union[DatasetSpec, TaskData],
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", eval_size: int = 64, tokenizer: Any = None,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, eval_batch_size: int = 8,
                 eval_token_budget: int = 16384,
                 attn_implementation: str = "sdpa", cuda_graphs: Optional[bool] = None,
                 pause_gc: Optional[bool] = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # Everything that can be wrong with the task is checked before the weights load.
        if isinstance(model, str):
            check_model_source(model)
        if isinstance(dataset, TaskData):
            self.data = dataset
        else:
            records = load_records(dataset)
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = _load_tokenizer(tokenizer or _tokenizer_source(model))
            self.data = TaskData(records, dataset, tokenizer)
        if isinstance(model, str):
            backbone = load_backbone(model, self.device, dtype, attn_implementation)
        else:
            backbone = freeze(model)
        self.model = MultiLoRAModel(backbone, target_modules, backend)
        self.dtype = self.model.compute_dtype()
        self.eval_size = int(eval_size)
        self.eval_batch_size = int(eval_batch_size)
        self.eval_token_budget = int(eval_token_budget)
        self._runs: Dict[str, _AdapterRun] = {}
        self._micro_steps = 0
        self._generation = 0  # bumped when adapters join or leave (keys of captured steps)
        self._graphs = _step_graphs(cuda_graphs, self.device, self.model)
        self.pause_gc = pause_gc_default(pause_gc)
        # The token loss through alto_kernels.cross_entropy where the LoRA kernels run (GPU): no
        # fp32 copy of the [tokens, vocab] logits, nor its log-softmax and gradient (4.2 GB less
        # peak and 1.3x faster head+loss at 8B, 4096 tokens; BENCHMARKS.md). ALTO_FUSED_CE=0:
        # F.cross_entropy over an fp32 copy, as on the reference backend.
        self._fused_loss = fused_loss_enabled()
        # Called as ``grad_hook(adapter, master.grad)`` once per step after the last backward,
        # before clipping: where a data-parallel user all-reduces an adapter's gradient (on a
        # GPU the kernels write master.grad directly, so autograd's tensor hooks never fire).
        self.grad_hook: Optional[Callable[[str, torch.Tensor], None]] = None
        model_type = getattr(getattr(backbone, "config", None), "model_type", None)
        self._decoder = backbone.get_decoder() if model_type in _PLAIN_HEAD_MODEL_TYPES else None
        self._head = backbone.get_output_embeddings() if self._decoder is not None else None

    # -- membership ---------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        return list(self._runs)

    @property
    def num_adapters(self) -> int:
        return len(self._runs)

    def adapter_config(self, name: str) -> AdapterConfig:
        return self._runs[name].cfg

    def add_adapter(self, name: str, cfg: AdapterConfig, state: Optional[Dict[str, Any]] = None) -> None:
        """Admit an adapter (fresh, or resumed from ``adapter_state``); others are untouched."""
        cfg.validate()
        if name in self._runs:
            raise ValueError(f"adapter {name!r} is already in this trainer")
        weights = self.model.add_adapter(name, cfg)
        run = _AdapterRun(weights, AdapterStream(len(self.data.train_examples), cfg.seed))
        if state is not None:
            try:
                _load_run_state(run, state)
            except Exception:
                self.model.remove_adapter(name)
                raise
        self._runs[name] = run
        self._membership_changed()

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter and free its slot (reused by the next ``add_adapter``)."""
        if name not in self._runs:
            raise KeyError(f"no adapter {name!r}")
        del self._runs[name]
        self.model.remove_adapter(name)
        self._membership_changed()

    def _membership_changed(self) -> None:
        """Captured steps hold the adapters' buffers and plans by address: drop them."""
        self._generation += 1
        if self._graphs is not None:
            self._graphs.invalidate()

    # -- the grouped step ---------------------------------------------------------------------
    def step(self) -> Dict[str, StepResult]:
        """One optimizer step of every adapter: ``max(grad_accum)`` packed fwd+bwd micro-steps."""
        with gc_paused(self.pause_gc):
            return self._step()

    def _step(self) -> Dict[str, StepResult]:
        runs = list(self._runs.values())
        if not runs:
            return {}
        n_micro = max(r.cfg.grad_accum for r in runs)
        loss_acc = torch.zeros(len(runs), device=self.device, dtype=torch.float32)
        tokens = [0] * len(runs)
        loss_tokens = [0] * len(runs)
        for micro in range(n_micro):
            active = [i for i, r in enumerate(runs) if micro < r.cfg.grad_accum]
            parts = [(runs[i].name, self._take(runs[i]), runs[i].cfg.max_seq_len) for i in active]
            # With CUDA graphs, shapes are rounded so that batches of varying lengths repeat them.
            batch = (pack_batch(parts, self.data.pad_id, self.device, GRAPH_WIDTH_MULTIPLE, GRAPH_LOSS_BUCKETS)
                     if self._graphs is not None else pack_batch(parts, self.data.pad_id, self.device))
            inv_accum = to_device(torch.tensor([1.0 / runs[i].cfg.grad_accum for i in active]), self.device)
            idx = to_device(torch.tensor(active), self.device)
            streams = {runs[i].name: runs[i].dropout_stream() for i in active}
            for i in active:
                runs[i].micro_steps += 1
            losses = self._forward_backward(batch, inv_accum, streams)
            loss_acc.index_add_(0, idx, losses * inv_accum)
            for j, i in enumerate(active):
                tokens[i] += batch.tokens[runs[i].name]
                loss_tokens[i] += batch.label_counts[j]
        if self.grad_hook is not None:
            for r in runs:
                if r.weights.master.grad is not None:
                    self.grad_hook(r.name, r.weights.master.grad)
        norms = torch.stack([_grad_norm(r.weights.master) for r in runs])
        stats = torch.stack([loss_acc, norms]).cpu().tolist()  # the step's one host sync
        results: Dict[str, StepResult] = {}
        for i, run in enumerate(runs):
            loss, norm = stats[0][i], stats[1][i]
            lr = lr_at(run.cfg, run.step)
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite and loss_tokens[i] > 0:  # no loss tokens, no gradient: no step
                try:
                    self._optimizer_step(run, lr, norms[i])
                except (RuntimeError, OverflowError) as err:  # e.g. an lr whose update overflows
                    logger.warning("adapter %s: optimizer step failed (%s); step reported non-finite",
                                   run.name, err)
                    finite = False  # this adapter's problem only: the others' steps go on
            # In place, not to None: on a GPU master.grad is the fused kernels' gradient sink.
            run.optimizer.zero_grad(set_to_none=False)
            run.step += 1
            results[run.name] = StepResult(run.step, loss, tokens[i], lr, norm, finite)
        return results

    def _forward_backward(self, batch: PackedBatch, inv_accum: torch.Tensor,
                          streams: Dict[str, int]) -> torch.Tensor:
        """One packed forward + backward; each adapter's mean token loss (detached, row_layout
        order). With CUDA graphs on, replayed from a capture where the batch's shape repeats."""
        def body(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
            flat, inv = inputs
            b = batch if flat is batch.device_buffer else batch.on_buffer(flat)
            losses = self._token_loss_sums(b, training=True, streams=streams) / b.loss_divisor
            (losses * inv).sum().backward()
            return losses.detach()

        graphs = self._graphs
        if graphs is None or batch.device_buffer is None:
            return body((batch.device_buffer, inv_accum))
        table = self.model.load_streams(streams)  # before the graph, which reads the table
        key = (self._generation, tuple(batch.row_layout), tuple(batch.input_ids.shape),
               batch.device_buffer.numel(), batch.padded, table.data_ptr())
        return graphs.run(key, (batch.device_buffer, inv_accum), body, keep=self.model.kernel_plans)

    def use_cuda_graphs(self, on: bool) -> bool:
        """Turn CUDA graphs of the micro-step on or off (as ``cuda_graphs`` at construction);
        returns whether they are on (not on a CPU, or without the fused kernels)."""
        self._graphs = _step_graphs(bool(on), self.device, self.model)
        return self._graphs is not None

    @property
    def graph_stats(self) -> Optional[Dict[str, int]]:
        """Micro-steps run eagerly / captured / replayed (None: CUDA graphs off)."""
        return dict(self._graphs.stats) if self._graphs is not None else None

    def _take(self, run: _AdapterRun) -> List[Example]:
        train = self.data.train_examples
        return [train[j] for j in run.stream.take(run.cfg.batch_size)]

    @staticmethod
    def _optimizer_step(run: _AdapterRun, lr: float, norm: torch.Tensor) -> None:
        grad = run.weights.master.grad
        if grad is None:
            return
        max_norm = run.cfg.max_grad_norm
        if 0 < max_norm < math.inf:  # torch.nn.utils.clip_grad_norm_'s formula, without a sync
            grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()

    def _token_loss_sums(self, batch: PackedBatch, training: bool,
                         streams: Optional[Dict[str, int]] = None) -> torch.Tensor:
        """Σ token losses per adapter (row_layout order), logits only where a label is."""
        n_rows, width = batch.input_ids.shape
        self._micro_steps += 1
        # No padding, no mask: what HF concludes itself after reading the mask on the device (a
        # host sync, and not possible inside a CUDA graph capture).
        mask = batch.attention_mask if batch.padded else None
        with self.model.batch(batch.row_layout, n_rows * width, training, seed=self._micro_steps,
                              streams=streams, width=width):
            if self._decoder is not None:
                hidden = self._decoder(input_ids=batch.input_ids, attention_mask=mask,
                                       use_cache=False).last_hidden_state
                hidden = hidden.reshape(n_rows * width, -1).index_select(0, batch.loss_index)
                logits = self._head(hidden)
            else:
                logits = self.model.backbone(input_ids=batch.input_ids, attention_mask=mask,
                                             use_cache=False).logits
                logits = logits.reshape(n_rows * width, -1).index_select(0, batch.loss_index)
        if self._fused_loss and self.model.runtime.uses_triton(logits.device):
            # fp32 inside, the gradient written over the logits: none of the [T, vocab] fp32
            # upcast, log-softmax and gradient copies (alto_kernels.fused_cross_entropy)
            token_loss = alto_kernels.cross_entropy(logits, batch.loss_targets)
        else:
            token_loss = F.cross_entropy(logits.float(), batch.loss_targets, reduction="none")
        sums = torch.zeros(len(batch.row_layout), device=self.device, dtype=torch.float32)
        return sums.index_add(0, batch.loss_owner, token_loss)

    # -- evaluation and inference -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Mean token loss on the held-out split (first ``eval_size`` examples) per adapter.

        Adapters share forwards, but each forward holds at most ``eval_token_budget`` tokens
        (logits over a 128k vocabulary for every eval token of 16 adapters at once would take
        tens of GB); on an out-of-memory error the budget halves and the evaluation restarts.
        """
        names = list(self._runs) if names is None else list(names)
        examples = self.data.eval_examples[:self.eval_size]
        if not names:
            return {}
        if not examples:
            return {n: float("nan") for n in names}
        while True:
            try:
                with gc_paused(self.pause_gc):
                    return self._evaluate(names, examples, self.eval_token_budget)
            except torch.cuda.OutOfMemoryError:
                if self.eval_token_budget <= 256:
                    raise
                self.eval_token_budget //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def eval_forward_count(self, names: Optional[Sequence[str]] = None) -> int:
        """Forward passes ``evaluate(names)`` will run: a rank-local group pads every other rank
        to the same number (its all-gathers are collectives)."""
        names = list(self._runs) if names is None else list(names)
        examples = self.data.eval_examples[:self.eval_size]
        if not names or not examples:
            return 0
        per_chunk, groups = self._eval_plan(names, examples, self.eval_token_budget)
        return len(groups) * math.ceil(len(examples) / per_chunk)

    def _eval_plan(self, names: List[str], examples: list, budget: int) -> tuple:
        """(examples per forward, adapter subsets): fewest examples per forward first, then as
        many adapters per forward as ``budget`` tokens allow."""
        lens = {n: min(self._runs[n].cfg.max_seq_len, max(len(e[0]) for e in examples)) for n in names}
        per_chunk = max(1, min(self.eval_batch_size, len(examples)))
        while per_chunk > 1 and per_chunk * max(lens.values()) > budget:
            per_chunk //= 2
        groups, cur, cur_tokens = [], [], 0
        for n in names:
            t = per_chunk * lens[n]
            if cur and cur_tokens + t > budget:
                groups.append(cur)
                cur, cur_tokens = [], 0
            cur.append(n)
            cur_tokens += t
        groups.append(cur)
        return per_chunk, groups

    def _evaluate(self, names: List[str], examples: list, budget: int) -> Dict[str, float]:
        per_chunk, groups = self._eval_plan(names, examples, budget)
        sums: Dict[str, float] = {n: 0.0 for n in names}
        counts: Dict[str, int] = {n: 0 for n in names}
        for group in groups:
            acc = torch.zeros(len(group), device=self.device)
            for lo in range(0, len(examples), per_chunk):
                chunk = examples[lo:lo + per_chunk]
                batch = pack_batch([(n, chunk, self._runs[n].cfg.max_seq_len) for n in group],
                                   self.data.pad_id, self.device)
                acc += self._token_loss_sums(batch, training=False)
                for n, k in zip(group, batch.label_counts):
                    counts[n] += k
            for n, v in zip(group, acc.cpu().tolist()):
                sums[n] += v
        return {n: (sums[n] / counts[n] if counts[n] else float("nan")) for n in names}

    @torch.no_grad()
    def logits(self, name: str, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The backbone's logits with adapter ``name`` applied to every row (inference, no dropout)."""
        input_ids = input_ids.to(self.device)
        rows = input_ids.numel()
        with self.model.batch([(name, 0, rows)], rows, training=False):
            return self.model.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).logits

    # -- checkpoint and export ----------------------------------------------------------------
    def adapter_state(self, name: str) -> Dict[str, Any]:
        """Everything to resume ``name`` exactly elsewhere: CPU tensors and plain data."""
        run = self._runs[name]
        return {
            "format": STATE_FORMAT,
            "name": name,
            "config": run.cfg.to_dict(),
            "lora": run.weights.master.detach().to("cpu", copy=True),
            "entries": _entry_rows(run.weights),
            "optimizer": _to_cpu(run.optimizer.state_dict()),
            "step": run.step,
            "stream": run.stream.state_dict(),
            # Dropout masks come from the adapter's seed and its own micro-step count: a resume
            # draws the masks it would have drawn, in any group.
            "rng": {"micro_steps": run.micro_steps},
        }

    def save_adapter(self, name: str, path: str) -> None:
        """A standard PEFT adapter directory for ``name``."""
        from .export import save_peft_snapshot

        save_peft_snapshot(self.adapter_snapshot(name)[0], path)

    def adapter_snapshot(self, name: str) -> Tuple[Any, Dict[str, Any]]:
        """``(PeftSnapshot, adapter_state)`` as CPU data: what a checkpoint needs, copied now and
        serialised later (``export.save_peft_snapshot``) without holding up the next step."""
        from .export import peft_snapshot

        base = getattr(getattr(self.model.backbone, "config", None), "_name_or_path", None)
        return peft_snapshot(self.model.adapters[name], base), self.adapter_state(name)


def _step_graphs(requested: Optional[bool], device: torch.device, model: MultiLoRAModel) -> Optional[StepGraphs]:
    """CUDA graphs of the micro-step: where asked (``cuda_graphs``, default ``ALTO_CUDA_GRAPHS``,
    off) and possible (a CUDA device whose LoRA layers run the fused kernels with gradient sinks;
    elsewhere the request is logged and the step runs eagerly)."""
    if requested is None:
        requested = os.environ.get("ALTO_CUDA_GRAPHS", "0").strip().lower() in ("1", "true", "yes", "on")
    if not requested:
        return None
    if device.type != "cuda" or not model.runtime.use_grad_sink(device):
        logger.info("cuda_graphs: needs a CUDA device with the fused kernels' gradient sinks; the step runs eagerly")
        return None
    return StepGraphs(max_graphs=GRAPH_MAX_SHAPES)


def _entry_rows(weights: AdapterWeights) -> List[list]:
    return [[e.module_name, e.rank, e.in_features, e.out_features, e.a_offset, e.b_offset] for e in weights.entries]


def _grad_norm(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros((), device=p.device)
    return torch.linalg.vector_norm(p.grad.float())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _load_run_state(run: _AdapterRun, state: Dict[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"state: unknown format {state.get('format')!r}")
    entries = _entry_rows(run.weights)
    if [list(e) for e in state["entries"]] != entries:
        raise ValueError("state: its LoRA layout (modules, rank, shapes) does not match this config and model")
    with torch.no_grad():
        run.weights.master.copy_(state["lora"].to(run.weights.master.device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.stream.load_state_dict(state["stream"])
    run.step = int(state["step"])
    run.micro_steps = int((state.get("rng") or {}).get("micro_steps", 0))


def _tokenizer_source(model: Union[str, nn.Module]) -> str:
    if isinstance(model, str):
        return check_model_source(model)
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ValueError("tokenizer: pass a tokenizer (or TaskData) when model is an nn.Module without a name")
    return source


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer: could not load one from {source!r} (pass tokenizer=, or check model): "
                         f"{exc}") from exc
