"""Admission control of an `AdapterGroup`: may one more adapter train on this device now?

The engine's `estimate_adapter_bytes` (the same formula the cluster allocator plans with) is
charged against a budget taken once, right after the backbone loaded: free memory only drops
after an adapter's first step, so re-measuring it per admission would over-admit. The estimates
are deliberate over-estimates; on a GPU each step's measured peak corrects them (with a margin),
and an out-of-memory step shrinks the budget to below what was charged when it happened.

A rank-local group (adapters on N rank processes, backbone sharded over them) is admitted by
`RankMemoryBudget`: per rank, against the memory its ranks reported (`memory_budget` picks it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional

logger = logging.getLogger(__name__)

_MARGIN = 1.15  # measured peak × this is what an estimate byte is taken to cost
_MIN_SCALE = 0.1


class MemoryBudget:
    """Count cap + estimated bytes against free device memory (host memory on a CPU)."""

    def __init__(self, device: str, model_config: Any, dtype: Any, headroom: float,
                 max_adapters: Optional[int], free: Optional[float] = None) -> None:
        self.device, self.model_config, self.dtype = device, model_config, dtype
        self.max_adapters = max_adapters
        self.budget = (free_bytes(device) if free is None else float(free)) * (1.0 - headroom)
        self.scale = 1.0  # measured / estimated
        self.charged: Dict[str, int] = {}
        self._base = allocated_bytes(device) or 0

    def admit(self, name: str, cfg: Any, active: Iterable[str]) -> bool:
        """Charge `name` and say yes if it fits next to `active`; a lone adapter always may."""
        active = list(active)
        self.charged = {t: b for t, b in self.charged.items() if t in active}
        need = self.estimate(cfg)
        if active:
            if self.max_adapters is not None and len(active) >= self.max_adapters:
                return False
            if self.scale * (self._load_for(cfg) + need) > self.budget:
                return False
        self.charged[name] = need
        return True

    def _load_for(self, cfg: Any) -> int:
        """Bytes already charged where `cfg` would go (one device: all of them)."""
        return sum(self.charged.values())

    def estimate(self, cfg: Any) -> int:
        if self.model_config is None:
            return 0
        try:
            from alto_ray.engine.memory import estimate_adapter_bytes

            return int(estimate_adapter_bytes(self.model_config, cfg, self.dtype))
        except Exception as err:  # no estimate for this architecture: only the count cap holds
            logger.debug("no adapter memory estimate: %s", err)
            return 0

    def after_step(self) -> None:
        """GPU: scale the estimates to the step's measured peak."""
        charged = sum(self.charged.values())
        if self.device != "cuda" or charged <= 0:
            return
        import torch

        peak = torch.cuda.max_memory_allocated() - self._base
        torch.cuda.reset_peak_memory_stats()
        if peak > 0:
            self.scale = min(1.0, max(_MIN_SCALE, _MARGIN * peak / charged))

    def on_oom(self) -> None:
        self.budget = 0.9 * self.scale * self._peak_load()
        logger.error("out of memory with %d adapters; admission budget now %.2f GB",
                     len(self.charged), self.budget / 1e9)

    def _peak_load(self) -> int:
        return sum(self.charged.values())


class RankMemoryBudget(MemoryBudget):
    """Admission of a rank-local group: each adapter lives on one rank, so the budget is per rank.

    The group's own process holds no device memory: the ranks report their free memory once, after
    the sharded backbone loaded (less the unsharded units they gather), and `free` is the smallest
    figure. An adapter is charged to the rank the trainer will route it to (`route(cfg)`, asked just
    before `add_adapter`), so the check is exact per rank. After each step on GPUs the ranks'
    measured peaks (`peaks()`: bytes per rank, None where not measured) correct the estimates as
    `MemoryBudget.after_step` does, by the worst rank's measured/charged ratio.
    """

    def __init__(self, model_config: Any, dtype: Any, headroom: float, max_adapters: Optional[int],
                 free: float, placement: Callable[[], Dict[str, int]], route: Callable[[Any], int],
                 peaks: Optional[Callable[[], List[Optional[int]]]] = None) -> None:
        super().__init__("ranks", model_config, dtype, headroom, max_adapters, free=max(0.0, free))
        self.placement, self.route, self.peaks = placement, route, peaks

    def after_step(self) -> None:
        """Scale the estimates to the ranks' measured peaks: the largest ratio of any rank that
        holds adapters, so no rank is charged less than it was seen to use."""
        measured = list(self.peaks() or []) if self.peaks is not None else []
        loads = self._rank_loads()
        ratios = [_MARGIN * peak / loads[rank] for rank, peak in enumerate(measured)
                  if peak is not None and peak > 0 and loads.get(rank, 0) > 0]
        if ratios:
            self.scale = min(1.0, max(_MIN_SCALE, max(ratios)))

    def _rank_loads(self) -> Dict[int, int]:
        where = self.placement()
        loads: Dict[int, int] = {}
        for t, b in self.charged.items():
            rank = where.get(t, -1)
            loads[rank] = loads.get(rank, 0) + b
        return loads

    def _load_for(self, cfg: Any) -> int:
        loads = self._rank_loads()
        return loads.get(self.route(cfg), 0) + loads.get(-1, 0)  # -1: charged, not placed (yet)

    def _peak_load(self) -> int:
        return max(self._rank_loads().values(), default=0)


def memory_budget(trainer: Any, device: str, headroom: float, max_adapters: Optional[int]) -> MemoryBudget:
    """The group's admission: the trainer's own (`memory_budget(headroom, max_adapters)`, e.g. a
    rank-local group whose memory is on other processes) or one over this process's `device`."""
    own = getattr(trainer, "memory_budget", None)
    if callable(own):
        return own(headroom, max_adapters)
    backbone = getattr(getattr(trainer, "model", None), "backbone", None)
    return MemoryBudget(device, getattr(backbone, "config", None), trainer.dtype, headroom, max_adapters)


# A group that ran out of memory learns a lower budget for itself (`MemoryBudget.on_oom`); a
# rank-local group cannot go on after one (its ranks are killed) and a restarted group would
# start from the same estimates. So the group also leaves a per-task cap on adapters in Ray's
# key-value store, which every later group of the task starts from.
_OOM_NAMESPACE = "alto"


def _oom_key(task_name: str) -> str:
    return f"oom_cap:{task_name}"


def oom_cap(task_name: str) -> Optional[int]:
    """The most adapters a group of this task may hold after an earlier one ran out of memory."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return None
        raw = _internal_kv_get(_oom_key(task_name), namespace=_OOM_NAMESPACE)
        return int(raw) if raw else None
    except Exception as err:  # pragma: no cover - no Ray / no store: no cap
        logger.debug("oom cap of %s: %s", task_name, err)
        return None


def record_oom(task_name: str, adapters: int) -> int:
    """A group of `task_name` ran out of memory holding `adapters`: cap later groups below that."""
    cap = max(1, int(adapters) - 1)
    known = oom_cap(task_name)
    cap = min(cap, known) if known else cap
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(_oom_key(task_name), str(cap), overwrite=True, namespace=_OOM_NAMESPACE)
    except Exception as err:  # pragma: no cover
        logger.warning("could not record the out-of-memory cap of %s: %s", task_name, err)
    logger.error("task %s: out of memory with %d adapters in a group; its groups now hold at most %d",
                 task_name, adapters, cap)
    return cap


def clear_oom_cap(task_name: str) -> None:
    """Forget the cap (it lives as long as the Ray cluster), e.g. before a sweep of smaller adapters."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_oom_key(task_name), namespace=_OOM_NAMESPACE)


def capped(max_adapters: Optional[int], cap: Optional[int]) -> Optional[int]:
    if cap is None:
        return max_adapters
    return cap if max_adapters is None else min(max_adapters, cap)


def free_bytes(device: str) -> float:
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return float("inf")


def allocated_bytes(device: str) -> Optional[int]:
    """torch.cuda.memory_allocated on a GPU group; None on a CPU one."""
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.memory_allocated())
