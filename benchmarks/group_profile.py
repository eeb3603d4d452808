"""Where a grouped step of the sweep goes: the engine alone (no Ray) on the sweep's workload.

Builds the sweep's model and data (``benchmarks/sweep.py``), adds the 16 sweep configurations to
one ``GroupedTrainer`` and times steps with 16 adapters, then with the 2 that survive in the
sweep, then profiles the 2-adapter steps (cProfile, top functions by own time). Compare with
``group_step_s`` in the alto arm's results to see what the Ray group adds.

    python benchmarks/group_profile.py [--steps 10]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sweep import EVAL_SIZE, SEQ_LEN, WARMUP, build_workdir, sweep_configs  # noqa: E402


def kernel_counters() -> dict:
    """Per launcher: its launches by path and the compiled variants of its kernel (a slow step
    that added variants compiled; one that added autotune launches tuned)."""
    from alto_kernels import fused, fused_rms_norm, fused_rotary, fused_silu_mul
    out = {}
    for lau in (*fused.LAUNCHERS, fused_rms_norm._FWD, fused_rms_norm._BWD, fused_silu_mul._FWD, fused_silu_mul._BWD,
                fused_rotary._LAUNCH):
        caches = getattr(lau.kernel.fn, "device_caches", {})
        variants = sum(len(v[0]) for v in caches.values()) if isinstance(caches, dict) else -1
        out[lau.name] = (dict(lau.launches), variants)
    return out


def _changed(before: dict, after: dict) -> dict:
    diff = {}
    for name, (launches, variants) in after.items():
        b_launches, b_variants = before.get(name, ({}, 0))
        d = {k: v - b_launches.get(k, 0) for k, v in launches.items() if k != "direct" and v != b_launches.get(k, 0)}
        if variants != b_variants:
            d["compiled"] = variants - b_variants
        if d:
            diff[name] = d
    return diff


def timed_steps(trainer, n: int) -> list:
    out = []
    for i in range(n):
        torch.cuda.synchronize()
        before = kernel_counters()
        t0 = time.perf_counter()
        trainer.step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        if out[-1] > 0.5:  # say why a step was slow: kernels tuned or compiled in it
            print(f"  step {i}: {out[-1]:.2f} s; Triton: {_changed(before, kernel_counters()) or 'nothing new'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/alto_sweep")
    args = ap.parse_args()
    from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer

    paths = build_workdir(args.workdir)
    t0 = time.perf_counter()
    trainer = GroupedTrainer(paths["model"], DatasetSpec(paths["data"], eval_size=EVAL_SIZE), device="cuda")
    print(f"load {time.perf_counter() - t0:.1f} s, dtype {trainer.dtype}")
    configs = sweep_configs()
    for i, c in enumerate(configs):
        trainer.add_adapter(f"t{i}", AdapterConfig(rank=c["rank"], alpha=c["alpha"], lr=c["lr"],
                                                   batch_size=c["batch_size"], dropout=c["dropout"],
                                                   max_seq_len=SEQ_LEN, warmup_steps=WARMUP, max_steps=200,
                                                   seed=c["seed"]))
    t0 = time.perf_counter()
    trainer.step()
    torch.cuda.synchronize()
    print(f"first step (autotune + compile) {time.perf_counter() - t0:.1f} s")
    s16 = timed_steps(trainer, args.steps)
    tok16 = sum(c["batch_size"] for c in configs) * SEQ_LEN
    print(f"16 adapters (~{tok16} tokens): median {statistics.median(s16):.3f} s/step  {s16}")
    t0 = time.perf_counter()
    trainer.evaluate()
    torch.cuda.synchronize()
    print(f"evaluate 16 adapters: {time.perf_counter() - t0:.2f} s")
    for i in range(16):
        if i not in (6, 10):
            trainer.remove_adapter(f"t{i}")
    t0 = time.perf_counter()
    trainer.step()
    torch.cuda.synchronize()
    print(f"first 2-adapter step {time.perf_counter() - t0:.1f} s")
    s2 = timed_steps(trainer, args.steps)
    print(f"2 adapters: median {statistics.median(s2):.3f} s/step  {s2}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        trainer.step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
