"""Host (Python + autograd) overhead of the multi-LoRA entry points, on a machine without a GPU.

The 8 x 512 kernel case is host-bound as called (BENCHMARKS.md, Kernels), and the lent GPU hosts
differ run to run by more than a change to the launcher's Python moves it. This measures that
Python alone: the Triton launches are stubbed out (``TunedLauncher.__call__`` does nothing), the
tensors are tiny CPU ones (so allocations and the base GEMMs cost ~nothing), and the variants
alternate in one process. What it cannot see: launch cost, which only a GPU host has (see
``kernel_host.py``). Figures from it are host overhead on this machine, not benchmark results.

    TRITON_INTERPRET=1 python benchmarks/host_overhead_cpu.py [--kernels DIR] [--rounds 15]

``--kernels``: import ``alto_kernels`` from DIR (e.g. an earlier commit's copy,
``git archive <commit> kernels/alto_kernels | tar x -C /tmp/old``, then ``--kernels /tmp/old/kernels``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.abspath(args.kernels))
    import torch

    from alto_kernels.fused import TunedLauncher
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    from kernel_check import hot_case_calls

    TunedLauncher.__call__ = lambda self, *a, **k: None  # no kernel runs: the host path alone
    TunedLauncher.choice = lambda self, *a, **k: self.kernel.configs[0]  # a config, as once tuned
    torch.set_num_threads(1)
    variants = hot_case_calls(args.adapters, 8, 32, torch.float32, "cpu")
    times: dict = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            for _ in range(20):
                fn()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    print(f"alto_kernels from {os.path.abspath(args.kernels)}; median of {args.rounds} rounds, µs per fwd+bwd:")
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.1f}")


if __name__ == "__main__":
    main()
