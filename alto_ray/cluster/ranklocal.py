"""Rank-local adapter parallelism: one adapter group over N ranks, each training its own adapters.

A backbone too big for one GPU is FSDP2-sharded across the N ranks of one process group
(``ranklocal_model.shard_backbone``). Unlike FSDP data parallelism, the ranks do not train the
same adapter on different data: each rank holds its own adapters (weights, gradients, optimizer
states) and trains them on its own batches with the engine's ``GroupedTrainer``. The ranks only
cooperate to materialise the frozen weights layer by layer (all-gathers), so:

* **no gradient sync, by construction.** The LoRA weights are not module parameters (the engine
  keeps each adapter as one flat tensor outside the module tree), so FSDP never manages them;
  the frozen weights have ``requires_grad=False`` and every FSDP unit has gradient sync switched
  off, so FSDP issues no reduce-scatter or all-reduce at all. The test counts collectives.
* **lock-step.** The all-gathers are collectives: every rank must run the same number of
  forwards (and backwards) through every FSDP unit. ``RankLocalTrainer`` guarantees it:
  a step runs ``micro_steps`` = the group-wide maximum of the adapters' ``grad_accum``
  on every rank; a rank with fewer (or no adapters at all) runs cheap padding micro-steps
  (one short pad sequence, no LoRA) through the same units. Evaluation pads the same way, to
  the group-wide maximum of forward passes (the engine may split many adapters over several).
  The embedding output is made to require grad during training so that backward reaches every
  layer on every rank whatever ``target_modules`` the local adapters have (otherwise a rank whose
  adapters skip the first layers would skip those layers' backward all-gathers and hang).

``RankLocalTrainer`` is the per-rank object (torchrun / mp.spawn / one Ray actor per rank);
``ranklocal_ray.RankLocalGroup`` runs N of them as Ray actors behind one group-like API.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from alto_ray.engine import DEFAULT_TARGET_MODULES, AdapterConfig, DatasetSpec, GroupedTrainer, StepResult, TaskData

PAD_SEQ_LEN = 8  # tokens of a padding micro-step: only the all-gathers matter, keep the compute tiny


class RankLocalTrainer:
    """This rank's share of a rank-local group: a ``GroupedTrainer`` over the sharded backbone.

    ``backbone`` must already be sharded with ``shard_backbone`` (or built by
    ``build_random_sharded_backbone``) in the current default process group. Every method that
    runs the model (``step``, ``evaluate``) is collective: call it on every rank, in the same
    order. Membership and checkpoint methods are local.
    """

    def __init__(self, backbone: nn.Module, dataset: Union[DatasetSpec, TaskData],
                 device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", eval_size: int = 64, tokenizer: Any = None,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, eval_batch_size: int = 8) -> None:
        if not dist.is_initialized():
            raise RuntimeError("RankLocalTrainer: init the group's process group first (init_rank_process_group)")
        self.trainer = GroupedTrainer(backbone, dataset, device=device, dtype=dtype, backend=backend,
                                      eval_size=eval_size, tokenizer=tokenizer, target_modules=target_modules,
                                      eval_batch_size=eval_batch_size)
        self.device = self.trainer.device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backbone = self.trainer.model.backbone
        self._decoder = self.backbone.get_decoder()
        self._head = self.backbone.get_output_embeddings()
        self._hook = self.backbone.get_input_embeddings().register_forward_hook(_embedding_requires_grad)
        self.padding_micro_steps = 0  # how many lock-step paddings this rank has run (for metrics)

    # -- membership, state: local to this rank ----------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        return self.trainer.adapter_names

    @property
    def num_adapters(self) -> int:
        return self.trainer.num_adapters

    def add_adapter(self, name: str, cfg: AdapterConfig, state: Optional[Dict[str, Any]] = None) -> None:
        self.trainer.add_adapter(name, cfg, state)

    def remove_adapter(self, name: str) -> None:
        self.trainer.remove_adapter(name)

    def adapter_state(self, name: str) -> Dict[str, Any]:
        return self.trainer.adapter_state(name)

    def save_adapter(self, name: str, path: str) -> None:
        self.trainer.save_adapter(name, path)

    def local_micro_steps(self) -> int:
        """Packed fwd+bwd passes this rank's step needs (0 with no adapters)."""
        names = self.trainer.adapter_names
        return max((self.trainer.adapter_config(n).grad_accum for n in names), default=0)

    def local_tokens_per_step(self) -> int:
        """Upper bound of this rank's tokens per step: the load measure for adapter routing."""
        cfgs = [self.trainer.adapter_config(n) for n in self.trainer.adapter_names]
        return sum(c.batch_size * c.max_seq_len * c.grad_accum for c in cfgs)

    # -- collective: every rank, same order ----------------------------------------------------
    def agree_micro_steps(self) -> int:
        """Group-wide max of ``local_micro_steps`` (one tiny all-reduce); a driver that knows
        every rank's adapters (``RankLocalGroup``) passes it to ``step`` instead."""
        t = torch.tensor([self.local_micro_steps()], device=self.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def step(self, micro_steps: Optional[int] = None) -> Dict[str, StepResult]:
        """One optimizer step of each local adapter, padded to ``micro_steps`` fwd+bwd passes."""
        local = self.local_micro_steps()
        if micro_steps is None:
            micro_steps = self.agree_micro_steps()
        if micro_steps < local:
            raise ValueError(f"micro_steps={micro_steps} < this rank's {local} (max grad_accum of its adapters)")
        results = self.trainer.step() if local else {}
        for _ in range(micro_steps - local):
            self._pad_pass(training=True)
        return results

    def eval_passes(self, names: Optional[Sequence[str]] = None) -> int:
        """Forward passes of this rank's ``evaluate(names)``: 0 when none of ``names`` lives here;
        more than one per example chunk when the engine splits the adapters over several forwards."""
        return self.trainer.eval_forward_count(self._local(names))

    def evaluate(self, names: Optional[Sequence[str]] = None, passes: Optional[int] = None) -> Dict[str, float]:
        """Eval loss of local adapters (all, or those of ``names`` that live here), lock-stepped:
        every rank runs ``passes`` forwards (default: the group-wide max, one tiny all-reduce),
        padding what its own adapters do not need."""
        local = self._local(names)
        mine = self.trainer.eval_forward_count(local)
        if passes is None:
            t = torch.tensor([mine], device=self.device, dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            passes = int(t.item())
        if passes < mine:
            raise ValueError(f"passes={passes} < this rank's {mine} evaluation forwards")
        results = self.trainer.evaluate(local) if local else {}
        with torch.no_grad():
            for _ in range(passes - mine):
                self._pad_pass(training=False)
        return results

    def _local(self, names: Optional[Sequence[str]]) -> List[str]:
        local = self.trainer.adapter_names
        return local if names is None else [n for n in names if n in local]

    def _pad_pass(self, training: bool) -> None:
        """One pass through every FSDP unit in the order the engine uses (decoder, then head),
        with no adapter: the same all-gathers as a real micro-step, almost no compute."""
        self.padding_micro_steps += int(training)
        pad_id = self.trainer.data.pad_id
        ids = torch.full((1, PAD_SEQ_LEN), pad_id, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        with nullcontext() if training else torch.no_grad():
            hidden = self._decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            out = self._head(hidden[:, -1])
            if training:
                out.float().sum().backward()

    def close(self) -> None:
        self._hook.remove()


def _embedding_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
    """Training only: backward must reach (and all-gather) every layer on every rank."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def lora_param_count(trainer: RankLocalTrainer) -> Dict[str, int]:
    """Elements of each local adapter's LoRA master (what stays on this rank)."""
    return {n: trainer.trainer.model.adapters[n].master.numel() for n in trainer.adapter_names}


@contextmanager
def count_collectives() -> Iterator[Dict[str, int]]:
    """Count the torch.distributed collectives issued inside the block (FSDP calls them through
    the ``torch.distributed`` module, so patching it sees them): the no-grad-sync check."""
    names = [n for n in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_single",
                         "all_gather_into_tensor", "all_gather", "all_gather_single", "broadcast")
             if hasattr(dist, n)]  # torch 2.13 FSDP2 uses the *_single forms, 2.11 the *_tensor ones
    counts = {n: 0 for n in names}
    originals = {n: getattr(dist, n) for n in names}

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    for n in names:
        setattr(dist, n, wrap(n, originals[n]))
    try:
        yield counts
    finally:
        for n in names:
            setattr(dist, n, originals[n])
