"""CUDA graphs through Ray Tune: the same sweep with ``LoRATask(cuda_graphs=False)`` and ``True``.

    python benchmarks/graph_tune.py --out benchmarks/results/graph_tune_h100.json
    python benchmarks/graph_tune.py --smoke --out /tmp/graph_tune.json    # CPU: graphs stay off

A check of the user's path, not a kernel benchmark: 12 trials (ranks 8-64, four learning rates,
batch 2) of one Llama-1B-shaped task (random bf16 weights) on one GPU, at most 8 adapters per
group (the other 4 wait and take the slots of trials AltoScheduler stops), on text of varying
length (192-504 tokens: batch widths and loss counts change every step, so shapes repeat only
through the trainer's rounding). Each arm runs in its own Ray session, one after the other.
Reports wall time, tokens/s over the whole fit, the median engine time of a group step, the
group's CUDA-graph replays, trial errors, and each trial's loss gap between the arms at the
steps both reached (dropout 0: only bf16 rounding and padding separate them). Exits 1 on a
trial error or when graphs were asked for on a GPU and never replayed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

RANKS, LRS = [8, 16, 32, 64], [1e-4, 3e-4, 1e-3]


def varying_lengths(path: str, n: int, low: int, high: int) -> str:
    from sweep import arithmetic_text

    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": arithmetic_text(rng, rng.randint(low, high))}) + "\n")
    return path


def run_arm(graphs: bool, model: str, data: str, args: argparse.Namespace) -> Dict[str, Any]:
    import ray
    from ray import tune

    from alto_ray import AltoScheduler, LoRATask, lora_trainable

    ray.init(include_dashboard=False)
    task = LoRATask(model=model, dataset=data, max_steps=args.steps, eval_every=args.steps, eval_size=16,
                    max_seq_len=args.seq, warmup_steps=5, steps_per_report=5, name="graphs",
                    max_adapters_per_group=8, checkpoint_every=args.steps, cuda_graphs=graphs)
    space = {"rank": tune.grid_search(RANKS), "lr": tune.grid_search(LRS), "alpha": 32, "batch_size": 2,
             "dropout": 0.0, "seed": 0}
    tuner = tune.Tuner(lora_trainable(task), param_space=space,
                       tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=AltoScheduler(time_attr="step")),
                       run_config=tune.RunConfig(storage_path=os.path.join(args.workdir, "ray"), name=f"graphs_{graphs}",
                                                 verbose=0, checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials, step_s, replays, tokens = {}, [], 0, 0
    for res in grid:
        key = f"r{res.config['rank']}_lr{res.config['lr']:g}"
        df = res.metrics_dataframe
        losses = {int(s): float(l) for s, l in zip(df["step"], df["loss"])} if df is not None and "loss" in df else {}
        trials[key] = {"steps": int(res.metrics.get("step", 0) or 0), "error": str(res.error) if res.error else None,
                       "losses": losses}
        tokens += int(res.metrics.get("tokens", 0) or 0)
        if df is not None and "group_step_s" in df:
            step_s += [float(x) for x in df["group_step_s"].dropna()]
        replays = max(replays, int(res.metrics.get("alto_graph_replays", 0) or 0))
    ray.shutdown()
    out = {"cuda_graphs": graphs, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
           "group_step_s_median": statistics.median(step_s) if step_s else None, "graph_replays": replays,
           "errors": sum(1 for t in trials.values() if t["error"]), "trials": trials}
    print(f"cuda_graphs={graphs}: {wall:.1f} s, {out['tokens_per_s']:.0f} tok/s, group step median "
          f"{(out['group_step_s_median'] or 0) * 1e3:.1f} ms, replays {replays}, errors {out['errors']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/alto_graph_tune")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU")
    args = ap.parse_args()
    command = "python benchmarks/graph_tune.py " + " ".join(sys.argv[1:])
    import torch

    from sweep import build_workdir

    if args.smoke:
        args.steps, args.seq = 10, 64
    os.makedirs(args.workdir, exist_ok=True)
    paths = build_workdir(args.workdir, n_records=8, smoke=args.smoke)
    data = varying_lengths(os.path.join(args.workdir, "varying.jsonl"), 400, args.seq * 3 // 8, args.seq - 8)
    arms = [run_arm(g, paths["model"], data, args) for g in (False, True)]
    gaps = []
    for key, off in arms[0]["trials"].items():
        on = arms[1]["trials"].get(key, {}).get("losses", {})
        for step, loss in off["losses"].items():
            if step in on and math.isfinite(loss) and math.isfinite(on[step]):
                gaps.append(abs(on[step] - loss) / max(abs(loss), 1e-12))
    result = {"command": command, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "shape": "Llama-1B (random bf16)" if not args.smoke else "smoke",
              "trials": len(RANKS) * len(LRS), "max_adapters_per_group": 8, "steps": args.steps,
              "arms": arms, "graph_over_eager_tokens_per_s": arms[1]["tokens_per_s"] / arms[0]["tokens_per_s"],
              "loss_gap_max": max(gaps) if gaps else None, "loss_gap_median": statistics.median(gaps) if gaps else None,
              "steps_compared": len(gaps)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"graphs/eager tokens/s {result['graph_over_eager_tokens_per_s']:.2f}; loss gap max "
          f"{result['loss_gap_max']}, median {result['loss_gap_median']} over {len(gaps)} steps", flush=True)
    failed = any(a["errors"] for a in arms) or (torch.cuda.is_available() and arms[1]["graph_replays"] == 0)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
