"""Does a fused multi-LoRA fwd+bwd wait for the GPU? Host cost measured with the GPU kept busy.

kernel_host.py times calls queued back to back, so a call that waits for the GPU somewhere (a
device-to-host copy, an allocator ``cudaFree``, a full launch queue) looks the same as a slow
host. Here the GPU is first given a long ``torch.cuda._sleep``; then a few calls are issued
while it sleeps. A call with no hidden wait returns long before the sleep ends, and the wall time
per call is the host's own cost (few enough launches that the queue never fills); a call that
waits shows the sleep in its wall time, and cProfile over the same calls names the function
that blocked. Also reported: the synchronising ops torch itself flags
(``torch.cuda.set_sync_debug_mode``) and device allocations made per call (the caching
allocator's ``cudaMalloc``/``cudaFree``, which synchronise).

    python benchmarks/sync_probe.py [--adapters 8] [--tokens 512] [--dim 4096] [--sleep-ms 300] [--engine 1b]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import hot_case_calls, import_alto_kernels  # noqa: E402


def sleep_cycles_per_ms() -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on this GPU."""
    torch.cuda._sleep(1_000_000)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def probe(name: str, fn: Callable[[], None], cycles_per_ms: float, sleep_ms: float, calls: int) -> Dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # 1) the host's own cost: calls issued while the GPU sleeps
    torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    total_ms = (time.perf_counter() - t0) * 1e3
    blocked = host_ms > 0.5 * sleep_ms
    # 2) allocator traffic per call (device allocations synchronise when they free)
    before = torch.cuda.memory_stats()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    allocs = {k: (after.get(k, 0) - before.get(k, 0)) / calls
              for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}
    # 3) what torch itself flags as synchronising
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    flagged = sorted({f"{os.path.basename(w.filename)}:{w.lineno} {str(w.message).splitlines()[0][:80]}" for w in caught})
    torch.cuda.synchronize()
    # 4) what one call runs on the GPU: kernels, memsets and copies, in order
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu_ops = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
    print(f"{name}: host {host_ms / calls:.3f} ms/call with the GPU busy ({calls} calls issued in "
          f"{host_ms:.1f} ms of a {sleep_ms:.0f} ms sleep; all done {total_ms:.1f} ms) -> "
          f"{'WAITS FOR THE GPU' if blocked else 'no wait'}; device allocs/call {allocs}; "
          f"sync-flagged ops in one call ({len(caught)}): {flagged or 'none'}; "
          f"GPU ops in one call: {len(gpu_ops)}" + (f" {[n[:40] for n in gpu_ops]}" if len(gpu_ops) <= 16 else ""))
    if blocked:  # name the function that waited: it holds the sleep in its own time
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
        print(out.getvalue())
    return {"host_ms": host_ms / calls, "blocked": float(blocked)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sleep-ms", type=float, default=300.0)
    ap.add_argument("--engine", default=None, metavar="SHAPE",
                    help="also probe the grouped engine's step at this engine.py shape (1b, 8b), 8 x 512 "
                         "r16: it is meant to wait once, for its losses at the end")
    args = ap.parse_args()
    import_alto_kernels()
    variants = hot_case_calls(args.adapters, args.tokens, args.dim, torch.bfloat16, "cuda")
    cycles = sleep_cycles_per_ms()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, sleep {cycles:.0f} cycles/ms; "
          f"{args.adapters} adapters x {args.tokens} tokens, {args.dim}->{args.dim}, r16, bf16")
    for name, fn in variants.items():
        probe(name, fn, cycles, args.sleep_ms, args.calls)
    if args.engine:
        probe(f"engine step ({args.engine}, {args.adapters} x {args.tokens})", engine_step(args), cycles,
              sleep_ms=5000.0, calls=3)


def engine_step(args) -> Callable[[], None]:
    from engine import SHAPES, build_backbone, random_examples

    from alto_ray.engine import AdapterConfig, GroupedTrainer, TaskData
    data = TaskData.from_examples(random_examples(64, args.tokens, SHAPES[args.engine]["vocab_size"], seed=1))
    trainer = GroupedTrainer(build_backbone(args.engine, torch.device("cuda"), torch.bfloat16), data,
                             device=torch.device("cuda"), backend="auto")
    for i in range(args.adapters):
        trainer.add_adapter(f"a{i}", AdapterConfig(rank=16, alpha=32, dropout=0.05, lr=1e-4, batch_size=1,
                                                   max_seq_len=args.tokens, max_steps=10_000, seed=i,
                                                   lr_schedule="constant", max_grad_norm=1.0))
    return lambda: trainer.step()


if __name__ == "__main__":
    main()
