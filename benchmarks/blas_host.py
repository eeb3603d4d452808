"""Host and device time of the base GEMMs as the engine calls them (``addmm_`` into a stored
delta, forward and backward), per BLAS library PyTorch may pick (cuBLASLt, cuBLAS).

The 1B step is host-bound and its profile shows ~50 us of host time per ``addmm_``; this checks
whether the library choice (``torch.backends.cuda.preferred_blas_library``) changes that, and
what it costs on the device, at the Llama-1B and Llama-8B projection shapes, 8 x 512 tokens:

    python benchmarks/blas_host.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import triton.testing

SHAPES = {"1b": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)],
          "8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]}


def host_us(fn, calls: int = 200) -> float:
    """Host time per call with the GPU's queue kept short (a sync every 20 calls)."""
    times = []
    for _ in range(calls // 20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        times.append((time.perf_counter() - t0) / 20 * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    default = str(torch.backends.cuda.preferred_blas_library()).split(".")[-1].lower()
    others = [lib for lib in ("cublas", "cublaslt") if lib != default]
    print(f"default library: {default}", flush=True)
    for lib in [default, *others]:
        torch.backends.cuda.preferred_blas_library(lib)
        for shape, dims in SHAPES.items():
            for k, n in dims:
                x = torch.randn(args.tokens, k, device=dev, dtype=dt)
                w = torch.randn(n, k, device=dev, dtype=dt)
                y = torch.zeros(args.tokens, n, device=dev, dtype=dt)
                dy = torch.randn(args.tokens, n, device=dev, dtype=dt)
                dx = torch.zeros(args.tokens, k, device=dev, dtype=dt)

                def fwd_bwd() -> None:
                    y.addmm_(x, w.t())
                    dx.addmm_(dy, w)

                fwd_bwd()
                rows.append({"library": lib, "shape": shape, "in": k, "out": n, "host_us": host_us(fwd_bwd),
                             "device_ms": triton.testing.do_bench_cudagraph(fwd_bwd)})
                print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens,
           "default_library": default, "rows": rows,
           "command": "python benchmarks/blas_host.py" + (f" --out {args.out}" if args.out else "")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
