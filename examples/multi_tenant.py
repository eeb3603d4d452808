"""Two tenants, two backbones, one Ray cluster: the coordinator places both tasks' adapter groups.

    python examples/multi_tenant.py                    # both tasks at once, local Ray (its GPUs if any)
    python examples/multi_tenant.py --device cpu       # the same, training on CPUs even beside a GPU
    python examples/multi_tenant.py --task a --address auto &   # or: two separate drivers / jobs
    python examples/multi_tenant.py --task b --address auto
    ray job submit --address http://HEAD:8265 --working-dir . -- python examples/multi_tenant.py

Each task is a small sweep (4 trials) over a tiny Llama built on the fly (task a: 2 layers,
hidden 64; task b: 3 layers, hidden 96) with `AltoScheduler`. Each tenant registers with the
cluster's `alto:coordinator`, waits in its queue if the cluster is full, trains its groups inside
the granted placement groups, and reports its best result back. Prints the coordinator's plan,
then each task's best config. About two minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from typing import Any

import ray
from ray import tune

from alto_ray.cluster.coordinator import get_coordinator
from alto_ray.cluster.tenant import Tenant, run_tenant
from alto_ray.engine.testing import make_tiny_llama, write_arithmetic_jsonl
from alto_ray.tune import AltoScheduler
from alto_ray.tune.task import LoRATask

SIZES = {"a": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
         "b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3)}


def build_task(which: str, root: str, steps: int, device: str = "auto") -> LoRATask:
    """A tiny Llama of size `which` and its own arithmetic data set, both on local disk."""
    cfg = SIZES[which]
    model = make_tiny_llama(os.path.join(root, f"tiny-llama-{cfg['hidden_size']}"), seed=ord(which), **cfg)
    data = write_arithmetic_jsonl(os.path.join(root, f"arith-{which}.jsonl"), n=256, seed=ord(which))
    return LoRATask(model=model, dataset=data, max_steps=steps, eval_every=max(steps // 4, 1), eval_size=32,
                    max_seq_len=32, device=device, idle_timeout_s=20.0,
                    adapter_defaults={"batch_size": 4, "warmup_steps": 2})


def param_space() -> dict:
    return {"lr": tune.choice([3e-4, 1e-3, 3e-3, 1e-2]), "rank": tune.choice([4, 8])}


def tune_config(samples: int, steps: int) -> tune.TuneConfig:
    scheduler = AltoScheduler(grace_period=max(steps // 4, 2), window=5, min_survivors=2)
    return tune.TuneConfig(metric="loss", mode="min", num_samples=samples, scheduler=scheduler)


def run_one(task: LoRATask, samples: int, steps: int, root: str, coord_opts: dict, max_groups: int,
            out: dict) -> None:
    """One tenant: register → queue → fit → finished; keeps the ResultGrid in `out`."""
    run_config = tune.RunConfig(name=task.task_name, storage_path=os.path.join(root, "ray_results"), verbose=0)
    out[task.task_name] = run_tenant(task, param_space(), tune_config(samples, steps), run_config,
                                     max_groups=max_groups, coordinator_options=coord_opts)


def print_plan_when_running(names: list[str], coord_opts: dict, done: threading.Event) -> None:
    """Print the coordinator's plan once every task runs and has reported measured steps."""
    coord = get_coordinator(**coord_opts)
    since = None
    while not done.is_set():
        tasks = ray.get(coord.metrics.remote())["tasks"]
        running = all(tasks.get(n, {}).get("status") == "running" for n in names)
        since = (since or time.time()) if running else None
        if running and (all(tasks[n]["measured"] for n in names) or time.time() - since > 90):
            print("\n=== coordinator plan (both tenants running; times from measured steps) ===")
            print(ray.get(coord.describe.remote()))
            for n in names:
                t = tasks[n]
                print(f"  {n}: {t['groups']} group(s), {t['adapter_step_s'] or 0:.3f} s per adapter-step, "
                      f"~{t['predicted_remaining_s']:.0f}s left")
            return
        time.sleep(1.0)


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["a", "b", "both"], default="both")
    ap.add_argument("--address", default=None, help="Ray address ('auto' to join a running cluster)")
    ap.add_argument("--samples", type=int, default=4, help="trials per task")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trial")
    ap.add_argument("--max-groups", type=int, default=1, help="most groups (GPUs / CPU slots) per task")
    ap.add_argument("--workdir", default=None, help="models, data and Tune results (default: a temp dir)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="where the groups train (auto: on a GPU when the cluster has them, one per group; "
                         "the coordinator then places GPUs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ray.init(address=args.address, log_to_driver=False)
    root = args.workdir or tempfile.mkdtemp(prefix="alto-multi-tenant-")
    coord_opts: dict = {}
    which = ["a", "b"] if args.task == "both" else [args.task]
    tasks = [build_task(w, root, args.steps, args.device) for w in which]
    for task in tasks:   # register all first, so the first plan already sees every tenant
        Tenant(task, args.samples, param_space=param_space(), max_groups=args.max_groups,
               coordinator_options=coord_opts).register()

    results: dict = {}
    done = threading.Event()
    threads = [threading.Thread(target=run_one, name=f"tenant-{w}",
                                args=(t, args.samples, args.steps, root, coord_opts, args.max_groups, results))
               for w, t in zip(which, tasks)]
    t0 = time.time()
    for th in threads:
        th.start()
    printer = threading.Thread(target=print_plan_when_running, args=([t.task_name for t in tasks], coord_opts, done),
                               daemon=True)
    printer.start()
    for th in threads:
        th.join()
    done.set()

    coord = get_coordinator(**coord_opts)
    finished = ray.get(coord.finished_results.remote())
    print(f"\n=== results ({time.time() - t0:.0f}s) ===")
    for task in tasks:
        name = task.task_name
        summary = (finished.get(name) or {}).get("results") or {}
        grid = results.get(name)
        print(f"{name}: {summary.get('num_trials', len(grid) if grid else 0)} trials, best config "
              f"{summary.get('best_config')} loss {summary.get('best_value')} checkpoint {summary.get('checkpoint')}")
    print("coordinator metrics:", ray.get(coord.metrics.remote()))
    missing = [t.task_name for t in tasks if t.task_name not in results]
    if missing:
        raise SystemExit(f"tenants failed: {missing}")


if __name__ == "__main__":
    main()
