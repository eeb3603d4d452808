"""Duration prediction for the allocator: analytic prior, corrected online by measured steps.

LoRA jobs are predictable: a task's remaining time on one group is its remaining
adapter-steps times the seconds per adapter-step, and a group step with k adapters costs about
k adapter-steps (the backbone GEMMs grow with the packed tokens).  Before any measurement the
seconds per adapter-step come from FLOPs:

    flops per adapter-step = 4 * params * tokens_per_adapter_step
        (frozen backbone: 2*P forward + 2*P input-gradient backward; LoRA's own cost is noise)
    seconds = flops / (peak_flops * mfu * gpus * efficiency(gpus))

with peak_flops = 780e12 (H100 bf16 matmul, measured), mfu = 0.30 (grouped multi-LoRA step;
PEFT reaches 33% at 4x1024 on Llama-8B shapes) and efficiency 0.85 for multi-GPU groups
(rank-local adapter parallelism).  Until a task's groups have stepped, its duration also counts
`startup_s` (group actor, backbone load, kernel compile: FLOPs say nothing of it, and for a small
model it is most of the task).  Measured step times replace the prior (EMA per task).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from alto_ray.cluster.plan import TaskSpec

H100_BF16_PEAK_FLOPS = 780e12
DEFAULT_MFU = 0.30
MULTI_GPU_EFFICIENCY = 0.85
DEFAULT_STARTUP_S = 30.0   # a group's start before its first step; the multi-tenant example's tiny tasks took 34-42 s in all


@dataclass
class _Task:
    params: float | None
    tokens_per_adapter_step: int | None
    gpus: int
    remaining: int = 0                                  # adapter-steps left (all trials)
    trials: dict[str, int] = field(default_factory=dict)  # per trial steps left, when known
    max_trial_steps: int = 0
    measured_step_s: float | None = None                # seconds per adapter-step, EMA
    started_at: float | None = None
    predicted_s: float | None = None
    groups: int = 1


class DurationPredictor:
    """Per-task predicted remaining duration, and how wrong past predictions were."""

    def __init__(self, peak_flops: float = H100_BF16_PEAK_FLOPS, mfu: float = DEFAULT_MFU,
                 multi_gpu_efficiency: float = MULTI_GPU_EFFICIENCY, ema: float = 0.3,
                 default_step_s: float = 1.0, startup_s: float = DEFAULT_STARTUP_S) -> None:
        self.peak_flops = peak_flops
        self.startup_s = startup_s
        self.mfu = mfu
        self.multi_gpu_efficiency = multi_gpu_efficiency
        self.ema = ema
        self.default_step_s = default_step_s
        self._tasks: dict[str, _Task] = {}
        self._errors: list[tuple[str, float, float]] = []   # (task, predicted, actual)

    # -- inputs ------------------------------------------------------------------------------------
    def register(self, task_id: str, *, params: float | None = None, tokens_per_adapter_step: int | None = None,
                 num_adapters: int = 1, steps_per_adapter: int = 0, gpus_per_group: int = 1) -> None:
        """Start tracking a task (idempotent: re-registering keeps measurements)."""
        old = self._tasks.get(task_id)
        t = _Task(params, tokens_per_adapter_step, gpus_per_group, num_adapters * steps_per_adapter,
                  max_trial_steps=steps_per_adapter)
        if old is not None:
            t.measured_step_s, t.started_at, t.predicted_s, t.groups = (old.measured_step_s, old.started_at,
                                                                        old.predicted_s, old.groups)
            t.trials, t.remaining, t.max_trial_steps = old.trials, old.remaining, old.max_trial_steps
        self._tasks[task_id] = t

    def register_spec(self, spec: TaskSpec) -> None:
        self.register(spec.name, params=spec.params, tokens_per_adapter_step=spec.tokens_per_adapter_step,
                      num_adapters=spec.num_adapters, steps_per_adapter=spec.steps_per_adapter or 0,
                      gpus_per_group=spec.gpus_per_group)

    def observe_step(self, task_id: str, step_time_s: float, *, tokens_per_step: int | None = None,
                     adapters_in_group: int | None = None) -> None:
        """One measured group step: converted to seconds per adapter-step (by tokens when given)."""
        t = self._tasks[task_id]
        if step_time_s <= 0 or not math.isfinite(step_time_s):
            return
        if tokens_per_step and t.tokens_per_adapter_step:
            per = step_time_s / tokens_per_step * t.tokens_per_adapter_step
        else:
            per = step_time_s / max(adapters_in_group or 1, 1)
        t.measured_step_s = per if t.measured_step_s is None else (1 - self.ema) * t.measured_step_s + self.ema * per

    def set_remaining(self, task_id: str, remaining_adapter_steps: int, max_trial_steps: int | None = None) -> None:
        """Remaining adapter-steps over all live trials (shrinks on early exit / STOP)."""
        t = self._tasks[task_id]
        t.remaining = max(int(remaining_adapter_steps), 0)
        if max_trial_steps is not None:
            t.max_trial_steps = max(int(max_trial_steps), 0)

    def trial_progress(self, task_id: str, trial_id: str, remaining_steps: int) -> None:
        """Per-trial remaining steps (0 when the trial stops); keeps the task total in sync."""
        t = self._tasks[task_id]
        t.trials[trial_id] = max(int(remaining_steps), 0)
        t.remaining = sum(t.trials.values())
        t.max_trial_steps = max(t.trials.values(), default=0)

    # -- predictions -------------------------------------------------------------------------------
    def prior_step_s(self, task_id: str) -> float:
        """Seconds per adapter-step from FLOPs (default_step_s without model size)."""
        t = self._tasks[task_id]
        if not t.params or not t.tokens_per_adapter_step:
            return self.default_step_s
        eff = 1.0 if t.gpus == 1 else self.multi_gpu_efficiency
        return 4.0 * t.params * t.tokens_per_adapter_step / (self.peak_flops * self.mfu * t.gpus * eff)

    def adapter_step_s(self, task_id: str) -> float:
        t = self._tasks[task_id]
        return t.measured_step_s if t.measured_step_s is not None else self.prior_step_s(task_id)

    def _startup_s(self, task_id: str) -> float:
        """The start still ahead: until a step is measured, the task's groups have not stepped."""
        return self.startup_s if self._tasks[task_id].measured_step_s is None else 0.0

    def work_s(self, task_id: str) -> float:
        """Remaining time on one group."""
        return self._tasks[task_id].remaining * self.adapter_step_s(task_id) + self._startup_s(task_id)

    def min_duration_s(self, task_id: str) -> float:
        """Critical path: the start, then the longest trial's remaining steps one after another."""
        return self._tasks[task_id].max_trial_steps * self.adapter_step_s(task_id) + self._startup_s(task_id)

    def duration_s(self, task_id: str, groups: int) -> float:
        return max(self.work_s(task_id) / max(groups, 1), self.min_duration_s(task_id))

    def apply(self, spec: TaskSpec) -> TaskSpec:
        """The spec with work_s / min_duration_s from the prediction, unless the tenant gave
        work_s and nothing has been measured yet (its own estimate beats our prior)."""
        if spec.name not in self._tasks:
            self.register_spec(spec)
        t = self._tasks[spec.name]
        if spec.work_s is None or t.measured_step_s is not None:
            spec.work_s = self.work_s(spec.name)
            spec.min_duration_s = self.min_duration_s(spec.name)
        return spec

    def predicted_at_start(self, task_id: str) -> float | None:
        """The duration predicted when the task started (mark_started), if any."""
        t = self._tasks.get(task_id)
        return None if t is None else t.predicted_s

    # -- error tracking ---------------------------------------------------------------------------
    def mark_started(self, task_id: str, groups: int, now: float | None = None,
                     predicted_s: float | None = None) -> float:
        """Remember the prediction made at start (ours unless `predicted_s` is given); returns it."""
        t = self._tasks[task_id]
        t.started_at = time.time() if now is None else now
        t.groups = groups
        t.predicted_s = self.duration_s(task_id, groups) if predicted_s is None else float(predicted_s)
        return t.predicted_s

    def mark_finished(self, task_id: str, now: float | None = None, actual_s: float | None = None) -> float | None:
        """Record predicted vs actual duration; returns the relative error (None if unknown)."""
        t = self._tasks.get(task_id)
        if t is None or t.predicted_s is None:
            return None
        if actual_s is None:
            if t.started_at is None:
                return None
            actual_s = (time.time() if now is None else now) - t.started_at
        return self.record(task_id, t.predicted_s, actual_s)

    def record(self, task_id: str, predicted_s: float, actual_s: float) -> float:
        """Record one (predicted, actual) pair; returns (predicted - actual) / actual."""
        self._errors.append((task_id, float(predicted_s), float(actual_s)))
        return (predicted_s - actual_s) / max(actual_s, 1e-9)

    def error_stats(self) -> dict:
        """count, mean |rel err|, mean rel err (bias: > 0 means over-predicting), max, per task."""
        rel = [((p - a) / max(a, 1e-9), task) for task, p, a in self._errors]
        if not rel:
            return {"count": 0, "mean_abs_rel_error": None, "mean_rel_error": None, "max_abs_rel_error": None,
                    "per_task": {}}
        return {
            "count": len(rel),
            "mean_abs_rel_error": sum(abs(r) for r, _ in rel) / len(rel),
            "mean_rel_error": sum(r for r, _ in rel) / len(rel),
            "max_abs_rel_error": max(abs(r) for r, _ in rel),
            "per_task": {task: {"predicted_s": p, "actual_s": a} for task, p, a in self._errors},
        }

    def forget(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks


def measured_error_stats(finished: dict[str, dict]) -> dict:
    """Error of the remaining-time prediction made at each task's first measured step
    (`finished`: the coordinator's finished records)."""
    errs = [r["measured_relative_error"] for r in finished.values() if r.get("measured_relative_error") is not None]
    return {"count": len(errs), "mean_abs_rel_error": sum(map(abs, errs)) / len(errs) if errs else None,
            "mean_rel_error": sum(errs) / len(errs) if errs else None}


class StepClock:
    """Seconds per group step, from a group's step count read at polls (the tenant's view).

    The clock starts at the first poll that finds the group past its first step: the time up to
    there is the group's start (actor, backbone load, kernel compile and autotune: seconds to
    minutes on a GPU), not its steady step time. Counting it made the first measured prediction
    of the multi-tenant example on an H100 ~20x too long. After that, each interval runs from
    the poll where the count last changed to the one where it changed again.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}   # group -> (poll time, steps) of the last change

    def observe(self, group: str, now: float, steps: int) -> float | None:
        """The mean seconds per step since the last change, or None (nothing to measure yet)."""
        prev = self._last.get(group)
        per_step = (now - prev[0]) / (steps - prev[1]) if prev is not None and steps > prev[1] else None
        if steps >= 1 and (prev is None or steps != prev[1]):
            self._last[group] = (now, steps)
        return per_step
