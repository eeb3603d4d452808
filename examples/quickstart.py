"""alto-ray quickstart: a 16-trial LoRA sweep on a local Ray cluster, in a few minutes on a laptop.

    bash scripts/quickstart.sh            # or: python examples/quickstart.py [--out DIR] [--steps N]

What happens:
1. A tiny Llama (+ tokenizer) and a learnable arithmetic data set are written to `--out`
   (no model hub needed). Point `LoRATask(model=..., dataset=...)` at your own instead.
2. Ray Tune samples 16 configurations over rank, alpha, lr and batch size, three of them
   deliberately bad (an lr so high the loss turns NaN, one far too high, one far too small).
3. All trials of the task train together in one `AdapterGroup` actor (on the GPU when Ray sees
   one, else on the CPU) that holds the backbone once; `AltoScheduler` stops the losers early
   and their slots go to the next trials at once.
4. It prints the early exits, the best configuration and where its PEFT adapter was saved.
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from alto_ray import AltoScheduler, LoRATask, lora_trainable  # noqa: E402
from alto_ray.engine.testing import make_tiny_llama, write_arithmetic_jsonl  # noqa: E402
from alto_ray.tune.metrics import TrialExitMetrics  # noqa: E402
from alto_ray.tune.scheduler import AltoDecisionCallback  # noqa: E402

BAD = [  # (why, config): AltoScheduler should stop each of these early
    ("lr so high the loss turns NaN", {"rank": 8, "alpha": 16, "lr": 1e20, "batch_size": 2}),
    ("lr far too high", {"rank": 8, "alpha": 16, "lr": 30.0, "batch_size": 2}),
    ("lr far too small", {"rank": 8, "alpha": 16, "lr": 1e-7, "batch_size": 2}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="model, data and Tune results go here")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trial")
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    out = os.path.abspath(args.out)

    model_dir = os.path.join(out, "tiny-llama")
    data_path = os.path.join(out, "arithmetic.jsonl")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        make_tiny_llama(model_dir)
    if not os.path.exists(data_path):
        write_arithmetic_jsonl(data_path, n=512)

    ray.init(include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs → "
          f"{'one AdapterGroup per GPU' if gpus else 'one AdapterGroup on the CPU'}")

    task = LoRATask(model=model_dir, dataset=data_path, max_steps=args.steps, eval_every=10,
                    eval_size=32, max_seq_len=48, name="quickstart")
    scheduler = AltoScheduler()
    tuner = tune.Tuner(
        lora_trainable(task),
        param_space={"rank": tune.choice([4, 8, 16]), "alpha": tune.choice([8, 16, 32]),
                     "lr": tune.loguniform(1e-3, 3e-2), "batch_size": tune.choice([2, 4]), "dropout": 0.0},
        tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=args.trials, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(points_to_evaluate=[c for _, c in BAD],
                                                                     random_state=0)),
        run_config=tune.RunConfig(name="quickstart", storage_path=os.path.join(out, "ray_results"), verbose=1,
                                  callbacks=[AltoDecisionCallback(scheduler), TrialExitMetrics(scheduler)],
                                  # the trainable checkpoints every `checkpoint_every` steps and at
                                  # the end; keep only the newest two per trial
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    report(grid, task, wall)
    ray.shutdown()


def report(grid: tune.ResultGrid, task: LoRATask, wall: float) -> None:
    results = [r for r in grid if r.config]
    steps = sum(int(r.metrics.get("step", 0)) for r in results)
    print(f"\n{len(results)} trials in {wall:.0f}s; {steps} adapter-steps trained of "
          f"{len(results) * task.max_steps} for running every trial to the end")

    print("\nEarly exits (AltoScheduler):")
    exits = [r for r in results if str(r.metrics.get("alto_decision", "")).startswith("stop:")]
    for r in sorted(exits, key=lambda r: r.metrics["step"]):
        print(f"  {_trial(r)}  stopped at step {r.metrics['step']:>3}  reason={r.metrics['alto_decision'][5:]:<9}"
              f"  {_short(r.config)}")
    if not exits:
        print("  (none)")

    finished = [r for r in results if r.metrics.get("step") == task.max_steps
                and math.isfinite(r.metrics.get("eval_loss", math.nan))]
    if not finished:
        print("\nNo trial finished.")
        return
    best = min(finished, key=lambda r: r.metrics["eval_loss"])
    print(f"\nBest config: {_short(best.config)}  eval_loss={best.metrics['eval_loss']:.4f} "
          f"(step {best.metrics['step']})")
    print(f"Its PEFT adapter: {best.checkpoint.path}")
    print("  load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
          f"{task.model!r}), {best.checkpoint.path!r})")


def _trial(r: tune.Result) -> str:
    return os.path.basename(r.path).split("_")[1] + "_" + os.path.basename(r.path).split("_")[2]


def _short(config: dict) -> str:
    keys = ("rank", "alpha", "lr", "batch_size")
    return " ".join(f"{k}={config[k]:.3g}" if isinstance(config.get(k), float) else f"{k}={config.get(k)}"
                    for k in keys)


if __name__ == "__main__":
    main()
