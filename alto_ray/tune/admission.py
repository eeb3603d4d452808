"""Admission control of an `AdapterGroup`: may one more adapter train on this device now?

The engine's `estimate_adapter_bytes` (the same formula the cluster allocator plans with) is
charged against a budget taken once, right after the backbone loaded: free memory only drops
after an adapter's first step, so re-measuring it per admission would over-admit. The estimates
are deliberate over-estimates; on a GPU each step's measured peak corrects them (with a margin),
and an out-of-memory step shrinks the budget to below what was charged when it happened.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

logger = logging.getLogger(__name__)

_MARGIN = 1.15  # measured peak × this is what an estimate byte is taken to cost
_MIN_SCALE = 0.1


class MemoryBudget:
    """Count cap + estimated bytes against free device memory (host memory on a CPU)."""

    def __init__(self, device: str, model_config: Any, dtype: Any, headroom: float,
                 max_adapters: Optional[int]) -> None:
        self.device, self.model_config, self.dtype = device, model_config, dtype
        self.max_adapters = max_adapters
        self.budget = free_bytes(device) * (1.0 - headroom)
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
            if self.scale * (sum(self.charged.values()) + need) > self.budget:
                return False
        self.charged[name] = need
        return True

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
        self.budget = 0.9 * self.scale * sum(self.charged.values())
        logger.error("out of memory with %d adapters; admission budget now %.2f GB",
                     len(self.charged), self.budget / 1e9)


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
