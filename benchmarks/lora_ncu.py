"""Hardware counters of the four LoRA kernels (Nsight Compute), at the headline case.

One fwd+bwd of ``fused_linear_multi_lora`` (the (b) op of ``lora_kernels.py``) per Llama-8B layer
shape, 8 adapters x 512 tokens, rank 16, bf16, after two warm-up calls (configs from the table,
compiled), inside ``cudaProfilerStart/Stop`` so that ncu sees only those launches:

    ncu --clock-control none --profile-from-start off -k regex:lora_ --set full \\
        python benchmarks/lora_ncu.py > ncu.txt

Why: at 8 x 512 the shrink and the dY pass move their bytes at 1.2-1.5 TB/s (``kernel_configs.py``),
well under the ~3 TB/s the device copies at, and no config of a wide grid did better; the counters
say whether they wait on memory latency, on the ticket/atomic tails, or on too few bytes in flight.
Without ncu (``--plain``) it prints each kernel's device time from torch.profiler instead.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, linear_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096")
    ap.add_argument("--plain", action="store_true", help="no ncu: per-kernel device time (torch.profiler)")
    args = ap.parse_args()
    import_alto_kernels()
    n, tok, r, dt = args.adapters, args.tokens, args.rank, torch.bfloat16
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for K, N in shapes:
        op = linear_case(n, tok, r, K, N, dt)[-1]
        for _ in range(2):
            op()
        torch.cuda.synchronize()
        print(f"=== shape {K}->{N}, {n}x{tok} r{r} bf16", flush=True)
        if args.plain:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    op()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
            continue
        torch.cuda.cudart().cudaProfilerStart()
        op()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
