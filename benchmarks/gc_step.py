"""The grouped step with Python's cyclic collector held off inside it (``pause_gc``) or not.

One trainer (8 r16 adapters over a random-weight Llama shape, as ``engine.py``), arms alternating
in the same process for ``--rounds`` rounds of ``--steps`` steps each: step wall time (mean,
median, max; the step ends in its one host sync, the losses) and the collections that ran
inside steps (count and time, by generation; a collection whose stack holds the trainer's
``_step`` frame). The mean is what a collection costs a run; the max is the stall.

    python benchmarks/gc_step.py --shape 1b --out benchmarks/results/gc_step_h100.json   # GPU
    python benchmarks/gc_step.py --shape smoke --seq 64                                   # CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import SHAPES, build_backbone, random_examples, sync, versions  # noqa: E402


class CollectionLog:
    """Collections that start inside the trainer's step, by generation: (count, seconds)."""

    def __init__(self) -> None:
        self.by_gen: Dict[int, List[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        self._t0 = None

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            f = sys._getframe(1)
            while f is not None and f.f_code.co_name != "_step":
                f = f.f_back
            self._t0 = time.perf_counter() if f is not None else None
        elif self._t0 is not None:
            entry = self.by_gen[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - self._t0
            self._t0 = None

    def take(self) -> Dict[str, Any]:
        out = {f"gen{g}": {"count": int(c), "ms": round(s * 1e3, 3)} for g, (c, s) in self.by_gen.items()}
        self.by_gen = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from alto_ray.engine import AdapterConfig, GroupedTrainer, TaskData

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    data = TaskData.from_examples(random_examples(64, args.seq, vocab, seed=1))
    trainer = GroupedTrainer(build_backbone(args.shape, device, dtype), data, device=device)
    for i in range(args.adapters):
        trainer.add_adapter(f"a{i}", AdapterConfig(rank=16, alpha=32, lr=1e-4 * (i + 1), batch_size=1,
                                                   max_seq_len=args.seq, max_steps=1_000_000, seed=i,
                                                   lr_schedule="constant"))
    for _ in range(args.warmup):
        trainer.step()
    sync(device)
    log = CollectionLog()
    gc.callbacks.append(log)
    arms: Dict[str, Dict[str, list]] = {a: {"step_ms": [], "collections": []} for a in ("paused", "default")}
    for _ in range(args.rounds):
        for arm in arms:
            trainer.pause_gc = arm == "paused"
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.step()
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            arms[arm]["step_ms"].extend(times)
            arms[arm]["collections"].append(log.take())
    gc.callbacks.remove(log)
    result: Dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape, "adapters": args.adapters, "seq": args.seq, "dtype": str(dtype),
        "steps_per_round": args.steps, "rounds": args.rounds, "tracked_objects": len(gc.get_objects()),
        "versions": versions(), "arms": {}}
    for arm, got in arms.items():
        ms = got["step_ms"]
        per_gen = {g: {"count": sum(c[g]["count"] for c in got["collections"]),
                       "ms": round(sum(c[g]["ms"] for c in got["collections"]), 3)} for g in ("gen0", "gen1", "gen2")}
        result["arms"][arm] = {"steps": len(ms), "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
                               "max_ms": max(ms), "collections_in_steps": per_gen,
                               "round_means_ms": [statistics.fmean(ms[i:i + args.steps])
                                                  for i in range(0, len(ms), args.steps)]}
    p, d = result["arms"]["paused"], result["arms"]["default"]
    result["default_over_paused_mean"] = d["mean_ms"] / p["mean_ms"]
    result["default_over_paused_median"] = d["median_ms"] / p["median_ms"]
    for arm, r in result["arms"].items():
        print(f"{arm:8s} mean {r['mean_ms']:.2f} ms  median {r['median_ms']:.2f}  max {r['max_ms']:.1f}  "
              f"collections in steps {r['collections_in_steps']}")
    print(f"default / paused: mean {result['default_over_paused_mean']:.3f}, median {result['default_over_paused_median']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
