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
            # Where a group's wall time goes: training vs waiting for its trials to fetch results
            # (a full run-ahead buffer: the Tune driver is the bottleneck) or for work to arrive.
            self.busy_s = Counter("alto_group_busy_seconds_total", "Seconds spent in grouped steps", _TAGS)
            self.idle_s = Counter("alto_group_idle_seconds_total", "Seconds between steps", _TAGS)
            self.exits = Counter("alto_trial_exits_total", "Adapters that left, by reason",
                                 _TAGS + ("reason",))
            self._ok = True
        except Exception as err:  # pragma: no cover - metrics unavailable
            logger.debug("alto metrics disabled: %s", err)

    def on_step(self, active: int, queued: int, tokens: int, seconds: float,
                gpu_bytes: Optional[int], idle_seconds: float = 0.0) -> None:
        if not self._ok:
            return
        try:
            self.active.set(active, tags=self._tags)
            self.queued.set(queued, tags=self._tags)
            self.steps.inc(1, tags=self._tags)
            if seconds > 0:
                self.busy_s.inc(seconds, tags=self._tags)
            if idle_seconds > 0:
                self.idle_s.inc(idle_seconds, tags=self._tags)
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


try:  # the driver-side half needs Tune; the group-side half above does not
    from ray.tune import Callback as _Callback
except Exception:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


class TrialExitMetrics(_Callback):  # type: ignore[misc,valid-type]
    """Tune callback (driver side): `alto_early_exits_total{task, reason}` for every trial end.

    The reason is the scheduler's (`nan`, `diverging`, `plateau`, `behind` with AltoScheduler)
    when it stopped the trial, else `done` or `error`. Groups cannot see this: a trial only
    learns that it was stopped, not why. Use: `RunConfig(callbacks=[TrialExitMetrics(sched)])`.
    """

    def __init__(self, scheduler: object = None) -> None:
        self._scheduler = scheduler
        self.counts: Dict[str, Dict[str, int]] = {}
        try:
            from ray.util.metrics import Counter

            self._counter = Counter("alto_early_exits_total", "Trials ended, by reason", ("task", "reason"))
        except Exception:  # pragma: no cover
            self._counter = None

    def _count(self, trial: object, reason: str) -> None:
        result = getattr(trial, "last_result", None) or {}
        task = str(result.get("alto_task") or getattr(trial, "trainable_name", "default"))
        by_task = self.counts.setdefault(task, {})
        by_task[reason] = by_task.get(reason, 0) + 1
        if self._counter is not None:
            try:
                self._counter.inc(1, tags={"task": task, "reason": reason})
            except Exception as err:  # pragma: no cover
                logger.debug("alto metrics: %s", err)

    def on_trial_complete(self, iteration: int, trials: list, trial: object, **info: object) -> None:
        why = getattr(self._scheduler, "stop_reason", lambda _: None)(getattr(trial, "trial_id", ""))
        self._count(trial, str(getattr(why, "value", why)) if why is not None else "done")

    def on_trial_error(self, iteration: int, trials: list, trial: object, **info: object) -> None:
        self._count(trial, "error")
