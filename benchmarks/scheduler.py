"""Scheduler micro-benchmark (CPU): AltoScheduler.on_trial_result with 1,000 trials.

Feeds synthetic LoRA-like loss curves (60% good with 5% noise, 10% diverging, 10% flat, 10%
clearly behind, 10% hitting NaN) through `on_trial_result` directly, in lock-step (step 1 of
every trial, then step 2, ...) as a grouped sweep reports, with real stub `Trial` objects (as
Ray's own scheduler tests build them) and the scheduler's default thresholds. Times every
call and reports median / p99 / mean milliseconds per result. Target: < 1 ms per result.

  python benchmarks/scheduler.py --trials 1000 --out benchmarks/results/scheduler.json \
      --summary benchmarks/results/summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from alto_ray.tune.scheduler import AltoScheduler  # noqa: E402


def synthetic_curve(rng: random.Random, steps: int) -> List[float]:
    """One trial's loss per step; the family is drawn at random (see module docstring)."""
    k, family = rng.uniform(0.01, 0.05), rng.random()
    clean = [0.5 + 1.5 * math.exp(-k * t) for t in range(1, steps + 1)]
    if family < 0.1:  # diverging from a random step on
        start = rng.randrange(steps // 5, steps)
        clean = [v * (1.2 ** max(0, t - start)) for t, v in enumerate(clean)]
    elif family < 0.2:  # the adapter barely moves
        clean = [2.0 - 0.001 * min(t, 10) for t in range(steps)]
    elif family < 0.3:  # improving, but well behind
        clean = [1.4 * v for v in clean]
    elif family < 0.4:  # numerically broken at some step
        clean[rng.randrange(steps)] = float("nan")
    return [v * (1.0 + rng.gauss(0.0, 0.05)) for v in clean]


def run(trials: int, steps: int, tasks: int, seed: int) -> Dict[str, object]:
    rng = random.Random(seed)
    sched = AltoScheduler(metric="loss", mode="min", max_t=steps)
    pool = [Trial("__fake", config={"task": f"task{i % tasks}", "idx": i}, stub=True) for i in range(trials)]
    curves = [synthetic_curve(rng, steps) for _ in pool]
    for trial in pool:
        sched.on_trial_add(None, trial)
    live = list(range(trials))
    times_ns: List[int] = []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        survivors = []
        for i in live:
            result = {"training_iteration": step, "loss": curves[i][step - 1], "max_steps": steps}
            start = clock()
            decision = sched.on_trial_result(None, pool[i], result)
            times_ns.append(clock() - start)
            if decision == TrialScheduler.STOP:
                sched.on_trial_complete(None, pool[i], result)
            else:
                survivors.append(i)
        live = survivors
    wall = time.perf_counter() - t0
    ms = sorted(t / 1e6 for t in times_ns)
    counts: Dict[str, int] = {}
    for per_task in sched.exit_counts().values():
        for reason, n in per_task.items():
            counts[reason] = counts.get(reason, 0) + n
    return {"trials": trials, "steps": steps, "tasks": tasks, "results": len(ms),
            "median_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "mean_ms": statistics.fmean(ms), "max_ms": ms[-1], "wall_s": wall,
            "survivors": len(live), "early_exits": counts}


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100, help="results per trial (until stopped)")
    ap.add_argument("--tasks", type=int, default=1, help="tasks the trials are spread over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--summary", type=Path, default=None, help="summary.json to merge scheduler.* into")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    res = {"device": cpu_model(), "command": command, **run(args.trials, args.steps, args.tasks, args.seed)}
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    if args.summary:  # merge: other benchmarks own the other keys
        summary = json.loads(args.summary.read_text()) if args.summary.exists() else {}
        summary[f"scheduler.ms_per_result_{args.trials}_trials"] = {
            "value": res["mean_ms"], "device": res["device"], "command": command}
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return res


if __name__ == "__main__":
    main()
