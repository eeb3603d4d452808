"""`AltoScheduler`: loss-aware early exit for Ray Tune, the ALTO way.

ALTO's first saving is not training weak LoRA configurations to the end. This scheduler watches
each trial's (smoothed) metric and stops a trial whose metric is non-finite, diverging,
plateaued, or clearly behind the best trial of the same task at the same step. It works with
any Tune trainable; the freed slot in an `AdapterGroup` is reclaimed by the trainable's
`cleanup` (not here).

Example (driving the scheduler directly, as Tune does on each result):
    >>> from ray.tune.experiment import Trial
    >>> s = AltoScheduler(metric="loss", mode="min", max_t=100, grace_period=1, window=5,
    ...                   smoothing=0.5, min_survivors=1)
    >>> a, b = (Trial("__fake", config={"task": "sft"}, stub=True) for _ in range(2))
    >>> for t in range(1, 11):  # warm-up: 10% of max_t
    ...     _ = s.on_trial_result(None, a, {"training_iteration": t, "loss": 2.0 / t ** 0.5})
    ...     decision = s.on_trial_result(None, b, {"training_iteration": t, "loss": 3.0 / t ** 0.5})
    >>> decision, s.stop_reason(b.trial_id).value, s.last_decision(a.trial_id)
    ('STOP', 'behind', 'continue')

With Tune (metric/mode may come from `TuneConfig`)::

    scheduler = AltoScheduler()
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler),
                       run_config=tune.RunConfig(callbacks=[AltoDecisionCallback(scheduler)]))
    grid = tuner.fit()
    [r.metrics.get("alto_decision") for r in grid]  # e.g. "stop:diverging" or "continue"
"""

from __future__ import annotations

import bisect
import logging
import math
import pickle
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from ray.tune.callback import Callback
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger(__name__)

DECISION_KEY = "alto_decision"  # result key carrying "stop:<reason>" (see `AltoDecisionCallback`)
_EPS = 1e-12


class StopReason(str, Enum):
    """Why a trial was stopped early."""

    NAN = "nan"  # metric NaN/inf: never recovers, so stopped at once, even during warm-up
    DIVERGING = "diverging"  # smoothed metric rising, well above the trial's own best
    PLATEAU = "plateau"  # no meaningful improvement over the window (and not the task leader)
    BEHIND = "behind"  # clearly worse than the best peer of its task at the same step


class Decision(str, Enum):
    """What the scheduler concluded on one result (Tune itself only sees CONTINUE / STOP)."""

    CONTINUE = "continue"  # judged, fine
    WARMUP = "warmup"  # too early to judge
    HELD = "held"  # would stop, but `min_survivors` keeps it running
    STOP = "stop"


@dataclass
class _TrialState:
    task: str
    alive: bool = True
    planned: Optional[float] = None  # planned steps, in time_attr units
    times: List[float] = field(default_factory=list)  # time_attr of each recorded result
    emas: List[float] = field(default_factory=list)  # smoothed, oriented (lower is better)
    bests: List[float] = field(default_factory=list)  # running best of `emas`
    reason: Optional[StopReason] = None
    last: Optional[str] = None  # last decision string, e.g. "held:plateau"


@dataclass
class _TaskState:
    alive: Set[str] = field(default_factory=set)  # trial ids not finished (pending/running/paused)
    times: List[float] = field(default_factory=list)  # sorted keys of `buckets`
    buckets: Dict[float, List[Tuple[float, str]]] = field(default_factory=dict)  # sorted (ema, id)
    stopped: Counter = field(default_factory=Counter)  # StopReason value -> count
    held: Set[str] = field(default_factory=set)  # trials kept running only by min_survivors
    finished: int = 0


class AltoScheduler(FIFOScheduler):
    """Loss-aware early exit: stop NaN, diverging, plateaued and clearly-behind trials.

    Decisions, for a trial at time `t` (its `time_attr`), on the EMA of its metric:

    * NaN/inf metric: STOP at once (`StopReason.NAN`), even in warm-up and regardless of
      `min_survivors` (a NaN adapter never recovers; keeping it only burns its slot).
    * Before the warm-up, `max(grace_period, warmup_frac * planned_steps)`: no decision.
    * DIVERGING: the EMA rose over the last `window` results and is more than
      `diverge_threshold` (relative) above the trial's best EMA.
    * PLATEAU: the best EMA improved by less than `plateau_threshold` (relative) over the last
      `window` results, unless the trial leads its task at this step.
    * BEHIND: the EMA is more than `behind_threshold` (relative) worse than the best peer's EMA
      of the same task at step `t` (or the nearest step <= t at which a peer reported).
    * A STOP other than NaN is held (CONTINUE) when it would leave fewer than `min_survivors`
      unfinished trials (pending, running or paused) in the task.

    Defaults are tuned for LoRA loss curves reported every optimizer step or few: LR warm-up
    and the fast initial drop fill the first ~10% of steps, during which configurations reorder
    (hence `warmup_frac=0.1`, `grace_period=10`); per-step losses on small batches are noisy by
    10-30%, so the EMA spans ~19 results (`smoothing=0.1`) and the window is 20 results;
    divergence needs a 25% rise over the trial's own best (far above the EMA's ~3-5% noise);
    a plateau is <0.2% improvement of the best EMA over 20 results (normal curves still gain
    that late in a few-hundred-step run); "behind" is 10% worse than the leader at equal steps
    (good configurations sit within a few % of each other, bad LRs/ranks tens of % away);
    `min_survivors=2` keeps a runner-up in case the early leader degrades (an extra adapter in
    a shared group is cheap).

    Task: `config[task_key]` (a nested key may be written "task/name"), else the trial's
    `trainable_name`, so it works with any trainable. Comparisons never cross tasks.

    Planned steps, in precedence: the trial's own `result[max_t_attr]` (e.g. `max_steps`, which
    `lora_trainable` reports; it knows its plan, and max_steps may be a searched
    hyperparameter), then the constructor's `max_t`; with neither, only `grace_period`
    gates decisions. `max_t` does not stop trials (they end themselves). With `lora_trainable`
    and `steps_per_report > 1`, pass `time_attr="step"` so steps and `max_steps` share units.

    The reason is surfaced three ways: `stop_reason(trial_id)` / `stop_reasons`; the trial's
    final `last_result[DECISION_KEY] = "stop:<reason>"` (so `ResultGrid` `Result.metrics` shows
    it); and, with `AltoDecisionCallback(scheduler)` in `RunConfig(callbacks=...)`, every
    logged result (result.json, progress.csv, `metrics_dataframe`). Tune gives the scheduler a
    flattened copy of the result, so writing into it in `on_trial_result` would be lost.

    Args:
        time_attr: monotonically increasing progress key (a step counter, not seconds).
        metric / mode: as in ASHA; may come from `TuneConfig` instead. For mode "max",
            diverging means falling and plateau means not rising.
        max_t: planned steps when a trial does not report `max_t_attr`.
        max_t_attr: result key with the trial's planned steps (None: ignore).
        warmup_frac: no decision before this fraction of the planned steps.
        grace_period: no decision before this many time units, whatever the plan.
        window: results over which divergence and plateau are judged.
        smoothing: EMA factor in (0, 1]; 1 disables smoothing.
        diverge_threshold / plateau_threshold / behind_threshold: relative thresholds.
        min_survivors: unfinished trials per task that are never stopped (except on NaN).
        task_key: config key naming the task.
    """

    def __init__(
        self,
        time_attr: str = "training_iteration",
        metric: Optional[str] = None,
        mode: Optional[str] = None,
        max_t: Optional[float] = None,
        max_t_attr: Optional[str] = "max_steps",
        warmup_frac: float = 0.1,
        grace_period: float = 10,
        window: int = 20,
        smoothing: float = 0.1,
        diverge_threshold: float = 0.25,
        plateau_threshold: float = 0.002,
        behind_threshold: float = 0.1,
        min_survivors: int = 2,
        task_key: Optional[str] = "task",
    ):
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"AltoScheduler.mode: 'min' or 'max', got {mode!r}")
        if max_t is not None and not max_t > 0:
            raise ValueError(f"AltoScheduler.max_t: must be > 0, got {max_t!r}")
        if not 0.0 <= warmup_frac < 1.0:
            raise ValueError(f"AltoScheduler.warmup_frac: must be in [0, 1), got {warmup_frac!r}")
        if grace_period < 0 or window < 1 or min_survivors < 0:
            raise ValueError("AltoScheduler: grace_period >= 0, window >= 1, min_survivors >= 0")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"AltoScheduler.smoothing: must be in (0, 1], got {smoothing!r}")
        if min(diverge_threshold, plateau_threshold, behind_threshold) < 0:
            raise ValueError("AltoScheduler: thresholds must be >= 0")
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._max_t, self._max_t_attr = max_t, max_t_attr
        self._warmup_frac, self._grace = float(warmup_frac), grace_period
        self._window, self._alpha = int(window), float(smoothing)
        self._diverge, self._plateau = float(diverge_threshold), float(plateau_threshold)
        self._behind, self._min_survivors = float(behind_threshold), int(min_survivors)
        self._task_key = task_key
        self._trials: Dict[str, _TrialState] = {}
        self._tasks: Dict[str, _TaskState] = {}

    # ------------------------------------------------------------------ Tune interface
    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        """Take metric/mode from `TuneConfig` unless set here (same contract as ASHA)."""
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    def on_trial_add(self, tune_controller: "TuneController", trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError(
                f"AltoScheduler needs a metric ({self._metric}) and mode ({self._mode}): pass them "
                "here or to tune.TuneConfig()")
        finished = trial.status in (Trial.TERMINATED, Trial.ERROR)
        ts = self._trials.get(trial.trial_id)
        if ts is None:  # new trial
            ts = self._trials[trial.trial_id] = _TrialState(task=self.task_of(trial))
            self._tasks.setdefault(ts.task, _TaskState())
        ts.alive = not finished  # re-added after an error (retry) or on experiment resume
        self._set_alive(trial.trial_id, ts)

    def on_trial_result(self, tune_controller: "TuneController", trial: Trial, result: Dict) -> str:
        decision, _ = self._decide(trial, result)
        return TrialScheduler.STOP if decision is Decision.STOP else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: "TuneController", trial: Trial, result: Dict) -> None:
        ts = self._trials.get(trial.trial_id)
        if ts is None:
            return
        if ts.reason is not None:  # we stopped it: put the reason on the result Tune keeps
            last = getattr(getattr(trial, "run_metadata", None), "last_result", None)
            if isinstance(last, dict):
                last[DECISION_KEY] = f"{Decision.STOP.value}:{ts.reason.value}"
        elif ts.alive:
            self._tasks[ts.task].finished += 1
        self._finish(trial.trial_id)

    def on_trial_remove(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._finish(trial.trial_id)  # a PENDING/PAUSED trial stopped by the controller

    def on_trial_error(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._finish(trial.trial_id)  # history kept: a retry re-adds it and replays its steps

    def debug_string(self) -> str:
        parts = []
        for name, task in sorted(self._tasks.items()):
            stops = ", ".join(f"{r} {n}" for r, n in sorted(task.stopped.items()) if n) or "none"
            parts.append(f"{name}: {len(task.alive)} running, {task.finished} finished, "
                         f"stopped ({stops}), {len(task.held)} held by min_survivors")
        return "Using AltoScheduler: " + ("; ".join(parts) or "no trials")

    def save(self, checkpoint_path: str) -> None:
        """Pickle all state (as ASHA does). Note Ray 2.60's TuneController never calls this;
        it is for callers that checkpoint the scheduler themselves."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # ------------------------------------------------------------------ queries
    @property
    def stop_reasons(self) -> Dict[str, StopReason]:
        """trial_id -> why it was stopped, for every trial this scheduler stopped."""
        return {tid: ts.reason for tid, ts in self._trials.items() if ts.reason is not None}

    def stop_reason(self, trial_id: str) -> Optional[StopReason]:
        ts = self._trials.get(trial_id)
        return ts.reason if ts else None

    def last_decision(self, trial_id: str) -> Optional[str]:
        """The decision on the trial's latest result: "continue", "warmup", "held:<reason>",
        "stop:<reason>" (None before its first result)."""
        ts = self._trials.get(trial_id)
        return ts.last if ts else None

    def exit_counts(self) -> Dict[str, Dict[str, int]]:
        """task -> {reason: early exits}, every reason present (zeros included), for metrics."""
        return {name: {r.value: task.stopped.get(r.value, 0) for r in StopReason}
                for name, task in self._tasks.items()}

    def task_of(self, trial: Trial) -> str:
        """The trial's task: `config[task_key]` (nested keys as "a/b"), else its trainable name."""
        value = _lookup(getattr(trial, "config", None) or {}, self._task_key)
        if value is None:
            return str(getattr(trial, "trainable_name", None) or "default")
        return str(getattr(value, "task_name", value))  # a LoRATask names itself

    # ------------------------------------------------------------------ the policy
    def _decide(self, trial: Trial, result: Dict) -> Tuple[Decision, Optional[StopReason]]:
        tid = trial.trial_id
        ts = self._trials.get(tid)
        if ts is None:  # driven without on_trial_add (direct use)
            self.on_trial_add(None, trial)  # type: ignore[arg-type]
            ts = self._trials[tid]
        if ts.reason is not None:  # already stopped: results after STOP are ignored by Tune
            return Decision.STOP, ts.reason
        t, x = result.get(self._time_attr), result.get(self._metric)
        if t is None or self._metric not in result:  # e.g. an eval-only result: nothing to judge
            ts.last = Decision.CONTINUE.value
            return Decision.CONTINUE, None
        planned = result.get(self._max_t_attr) if self._max_t_attr else None
        if isinstance(planned, (int, float)) and planned > 0:
            ts.planned = float(planned)
        elif ts.planned is None:
            ts.planned = self._max_t
        try:
            value = float(x)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            return self._stop(tid, ts, StopReason.NAN), StopReason.NAN
        if ts.times and t <= ts.times[-1]:  # replay after a restore from checkpoint
            self._rewind(tid, ts, t)
        task = self._tasks[ts.task]
        ema = self._record(tid, ts, task, t, value if self._mode == "min" else -value)
        warmup = max(self._grace, self._warmup_frac * ts.planned if ts.planned else 0.0)
        if t < warmup:
            ts.last = Decision.WARMUP.value
            return Decision.WARMUP, None
        reason = self._judge(tid, ts, task, t, ema)
        if reason is None:
            task.held.discard(tid)
            ts.last = Decision.CONTINUE.value
            return Decision.CONTINUE, None
        if len(task.alive) - 1 < self._min_survivors:
            task.held.add(tid)
            ts.last = f"{Decision.HELD.value}:{reason.value}"
            return Decision.HELD, reason
        return self._stop(tid, ts, reason), reason

    def _judge(self, tid: str, ts: _TrialState, task: _TaskState, t: float, ema: float) -> Optional[StopReason]:
        """O(window): own history by index, peers by one bisect into the task's step buckets."""
        best = ts.bests[-1]
        i0 = len(ts.emas) - 1 - self._window  # the record one window ago (< 0: not yet)
        if ema > ts.emas[max(i0, 0)] and _rel(ema, best) > self._diverge:
            return StopReason.DIVERGING  # a short history suffices: the rise is already large
        peer = self._best_peer(tid, task, t)
        if i0 >= 0 and _rel(ts.bests[i0], best) < self._plateau and peer is not None and ema > peer:
            return StopReason.PLATEAU
        if peer is not None and _rel(ema, peer) > self._behind:
            return StopReason.BEHIND
        return None

    def _best_peer(self, tid: str, task: _TaskState, t: float) -> Optional[float]:
        """Best peer EMA at step t, else at the nearest earlier step some peer reported
        (looks back at most `window` steps; an older peer value is a conservative reference)."""
        i = bisect.bisect_right(task.times, t) - 1
        for _ in range(self._window):
            if i < 0:
                return None
            for value, other in task.buckets[task.times[i]][:2]:  # one of two is not us
                if other != tid:
                    return value
            i -= 1
        return None

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, tid: str, ts: _TrialState, task: _TaskState, t: float, v: float) -> float:
        ema = v if not ts.emas else ts.emas[-1] + self._alpha * (v - ts.emas[-1])
        ts.times.append(t)
        ts.emas.append(ema)
        ts.bests.append(min(ema, ts.bests[-1]) if ts.bests else ema)
        bucket = task.buckets.get(t)
        if bucket is None:
            bucket = task.buckets[t] = []
            bisect.insort(task.times, t)
        bisect.insort(bucket, (ema, tid))
        return ema

    def _rewind(self, tid: str, ts: _TrialState, t: float) -> None:
        """Forget the trial's records at steps >= t (it resumed from an earlier checkpoint)."""
        task = self._tasks[ts.task]
        while ts.times and ts.times[-1] >= t:
            tt, ema = ts.times.pop(), ts.emas.pop()
            ts.bests.pop()
            bucket = task.buckets[tt]
            i = bisect.bisect_left(bucket, (ema, tid))
            if i < len(bucket) and bucket[i] == (ema, tid):
                del bucket[i]
            if not bucket:
                del task.buckets[tt]
                del task.times[bisect.bisect_left(task.times, tt)]

    def _stop(self, tid: str, ts: _TrialState, reason: StopReason) -> Decision:
        ts.reason = reason
        ts.last = f"{Decision.STOP.value}:{reason.value}"
        self._tasks[ts.task].stopped[reason.value] += 1
        self._finish(tid)
        logger.info("AltoScheduler: stopping trial %s (task %s): %s", tid, ts.task, reason.value)
        return Decision.STOP

    def _finish(self, tid: str) -> None:
        ts = self._trials.get(tid)
        if ts is not None:
            ts.alive = False
            self._set_alive(tid, ts)
            self._tasks[ts.task].held.discard(tid)

    def _set_alive(self, tid: str, ts: _TrialState) -> None:
        alive = self._tasks[ts.task].alive
        alive.add(tid) if ts.alive else alive.discard(tid)


class AltoDecisionCallback(Callback):
    """Stamps every logged result with the scheduler's decision (`DECISION_KEY`).

    Tune lets callbacks modify the result in place right after the scheduler decided, before it
    is logged, so the decision reaches result.json, progress.csv and `metrics_dataframe`.
    """

    def __init__(self, scheduler: AltoScheduler):
        self._scheduler = scheduler

    def on_trial_result(self, iteration: int, trials: List[Trial], trial: Trial, result: Dict, **info: Any) -> None:
        decision = self._scheduler.last_decision(trial.trial_id)
        if decision is not None:
            result[DECISION_KEY] = decision


def _rel(worse: float, better: float) -> float:
    """How much `worse` exceeds `better`, relative to |better| (lower is better)."""
    return (worse - better) / max(abs(better), _EPS)


def _lookup(config: Dict[str, Any], key: Optional[str]) -> Any:
    if not key:
        return None
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
