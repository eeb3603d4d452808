"""Host (CPU) cost of one fused multi-LoRA fwd+bwd: where the launcher's time goes.

At 8 adapters × 512 tokens the LoRA work on an H100 is a fraction of a millisecond, so the
Python launcher decides the step time. This runs the hot case under cProfile (GPU work queued,
never waited on except once at the end) and prints the top functions by own time, plus the
wall time per call with and without a device sync.

    python benchmarks/kernel_host.py [--adapters 8] [--tokens 512] [--calls 300]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import hot_case_calls, import_alto_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--ab", default=None, metavar="FLAG",
                    help="a boolean of alto_kernels.fused or, as MODULE.FLAG, of another module "
                         "of alto_kernels (e.g. _common.DIRECT_APPLY): time each variant with it off and "
                         "on, alternating in this process for --rounds rounds, and print the medians")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    import_alto_kernels()
    calls = hot_case_calls(args.adapters, args.tokens, args.dim, torch.bfloat16, "cuda")
    base_only, linear_op = calls["base (a)"], calls["fused_linear_multi_lora (b)"]
    fwd_bwd, sink = calls["fused_multi_lora (b-, two nodes)"], calls["the engine's two-node path (sink)"]
    linear = calls["the engine's one-node path (b'', sink)"]
    for _ in range(5):
        for fn in calls.values():
            fn()
    torch.cuda.synchronize()
    from alto_kernels import _common
    direct = _common.DIRECT_LAUNCH
    if args.ab:
        same_process_ab(args.ab, args.rounds, args.calls, {
            "fused_linear_multi_lora (b)": linear_op, "fused": fwd_bwd, "fused_sink": sink,
            "fused_linear (one node)": linear})
        return
    for name, fn, launch, skip_hooks in (
            ("base", base_only, direct, True), ("fused_linear_multi_lora (b)", linear_op, direct, True),
            ("fused", fwd_bwd, direct, True), ("fused_sink", sink, direct, True),
            ("fused_linear (one node)", linear, direct, True),
            ("fused_sink, launch hooks called even when empty", sink, direct, False),
            ("fused, Triton dispatch", fwd_bwd, False, True), ("fused_sink, Triton dispatch", sink, False, True)):
        _common.DIRECT_LAUNCH, _common.SKIP_EMPTY_HOOKS = launch, skip_hooks
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) / args.calls
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / args.calls
        print(f"{name}: host {host * 1e3:.3f} ms/call (queued), {total * 1e3:.3f} ms/call incl. sync")
    _common.DIRECT_LAUNCH, _common.SKIP_EMPTY_HOOKS = direct, True
    from alto_kernels import fused as _fused
    print("launches:", {lau.name: dict(lau.launches) for lau in _fused.LAUNCHERS})
    for title, fn in (("fused_linear_multi_lora (b)", linear_op), ("fused_multi_lora", fwd_bwd),
                      ("the engine's path (gradient sink)", sink)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- {title}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def same_process_ab(flag: str, rounds: int, calls: int, variants: dict) -> None:
    """Host time per call of each variant with ``alto_kernels.fused.<flag>`` (or, for a flag
    ``MODULE.NAME``, ``alto_kernels.MODULE.NAME``) off and on, the arms alternating within one
    process (separate processes on a lent host differ by more than the effects measured here)."""
    import importlib
    import statistics

    module, _, flag = flag.rpartition(".")
    _fused = importlib.import_module(f"alto_kernels.{module or 'fused'}")
    if not isinstance(getattr(_fused, flag, None), bool):
        raise SystemExit(f"alto_kernels.{module or 'fused'}.{flag} is not a boolean switch")
    times = {(name, on): [] for name in variants for on in (False, True)}
    for _ in range(rounds):
        for on in (False, True):
            setattr(_fused, flag, on)
            for name, fn in variants.items():
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[(name, on)].append((time.perf_counter() - t0) / calls * 1e3)
                torch.cuda.synchronize()
    for name in variants:
        off, on = (statistics.median(times[(name, v)]) for v in (False, True))
        print(f"{name}: {flag}=0 {off:.3f} ms/call, {flag}=1 {on:.3f} ms/call (median of {rounds}), "
              f"on/off {on / off:.3f}; per round off {[round(t, 3) for t in times[(name, False)]]} "
              f"on {[round(t, 3) for t in times[(name, True)]]}")


if __name__ == "__main__":
    main()
