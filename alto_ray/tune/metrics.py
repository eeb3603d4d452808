"""Ray metrics of an `AdapterGroup` (exported to Prometheus / the Ray dashboard).

Everything is tagged with `task` and `group`, so a dashboard can show one line per GPU actor.
Metrics must never break training: every call is guarded, and a process without a metrics
agent (plain `ray.init(include_dashboard=False)`) simply records nothing useful.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

logger = logging.getLogger(__name__)

_TAGS = ("task", "group")
EXIT_REASONS = ("done", "stopped", "error", "evicted", "nonfinite", "group_lost")


class GroupMetrics:
    """Gauges and counters of one group; names are prefixed `alto_`."""

    def __init__(self, task: str, group: str) -> None:
        self._tags = {"task": task, "group": group}
        self._ok = False
        try:
            from ray.util.metrics import Counter, Gauge

            self.active = Gauge("alto_adapters_active", "Adapters training in the group", _TAGS)
            self.queued = Gauge("alto_adapters_queued", "Trials waiting for admission", _TAGS)
            self.tokens_per_s = Gauge("alto_tokens_per_second", "Training tokens/s of the group", _TAGS)
            self.gpu_bytes = Gauge("alto_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", _TAGS)
            self.steps = Counter("alto_group_steps_total", "Grouped optimizer steps", _TAGS)
            self.tokens = Counter("alto_tokens_total", "Training tokens processed", _TAGS)
            self.exits = Counter("alto_trial_exits_total", "Adapters that left, by reason",
                                 _TAGS + ("reason",))
            self._ok = True
        except Exception as err:  # pragma: no cover - metrics unavailable
            logger.debug("alto metrics disabled: %s", err)

    def on_step(self, active: int, queued: int, tokens: int, seconds: float,
                gpu_bytes: Optional[int]) -> None:
        if not self._ok:
            return
        try:
            self.active.set(active, tags=self._tags)
            self.queued.set(queued, tags=self._tags)
            self.steps.inc(1, tags=self._tags)
            if tokens > 0:
                self.tokens.inc(tokens, tags=self._tags)
            if seconds > 0:
                self.tokens_per_s.set(tokens / seconds, tags=self._tags)
            if gpu_bytes is not None:
                self.gpu_bytes.set(gpu_bytes, tags=self._tags)
        except Exception as err:  # pragma: no cover
            logger.debug("alto metrics: %s", err)

    def on_membership(self, active: int, queued: int) -> None:
        if not self._ok:
            return
        try:
            self.active.set(active, tags=self._tags)
            self.queued.set(queued, tags=self._tags)
        except Exception as err:  # pragma: no cover
            logger.debug("alto metrics: %s", err)

    def on_exit(self, reason: str) -> None:
        if not self._ok:
            return
        try:
            tags: Dict[str, str] = dict(self._tags, reason=str(reason))
            self.exits.inc(1, tags=tags)
        except Exception as err:  # pragma: no cover
            logger.debug("alto metrics: %s", err)
