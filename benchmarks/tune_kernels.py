"""Autotune the fused multi-LoRA kernels over the shapes alto-ray meets and write the config table.

    python benchmarks/tune_kernels.py --out kernels/alto_kernels/tuned/<GPU>.json     # on the GPU it is for

With ``ALTO_AUTOTUNE=full`` every launch key (dtypes, flags, feature size, padded rank R, token
bucket) is tuned from the full config lists; the chosen configs are written as the table that
``alto_kernels`` loads for this GPU model (``kernels/alto_kernels/tuned/<device>.json``). With the table, a
process compiles one config per kernel variant instead of every config for every new key: the
first grouped step of a sweep and every step that meets a new rank or batch size skip the
compile-and-time loop (see ``ALTO_AUTOTUNE`` in ``kernels/alto_kernels/_common.py``).

Grid: the layer shapes of Llama-1B and Llama-8B (q/k/v/o/gate/up/down), R ∈ {16, 64}, token
buckets 1024…65536 (mixed ranks per call so the rank axis pads to R), bf16, dropout 0.05,
the fused training path (fwd + bwd with dX) and the gradient-sink path. It also reports how long
the tuning took, which is what a process without the table pays on first use.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["ALTO_AUTOTUNE"] = "full"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import import_alto_kernels  # noqa: E402

LAYERS = {"1b": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)],
          "8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
          "tiny": [(64, 48)]}  # a CPU check of the script under TRITON_INTERPRET=1
RANKS = {16: [8, 16, 16, 8], 64: [16, 64, 32, 8]}
TOKENS = [1024, 4096, 16384, 65536]


def run_case(K: int, N: int, T: int, ranks, dropout: float, sink: bool) -> None:
    from alto_kernels.fused import apply_multi_lora, fused_multi_lora, prepare_multi_lora

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    n = len(ranks)
    lens = [T // n] * n
    lens[-1] += T - sum(lens)
    offs = [0]
    for m in lens:
        offs.append(offs[-1] + m)
    A = [(torch.randn(r, K, device=dev) * K ** -0.5).to(dt) for r in ranks]
    B = [(torch.randn(N, r, device=dev) * 0.01).to(dt) for r in ranks]
    scales = [2.0] * n
    ps = [dropout] * n
    x = torch.randn(T, K, device=dev, dtype=dt, requires_grad=True)
    base = torch.randn(T, N, device=dev, dtype=dt, requires_grad=True)
    if sink:
        ga = [torch.zeros(a.shape, device=dev) for a in A]
        gb = [torch.zeros(b.shape, device=dev) for b in B]
        plan = prepare_multi_lora(x, base, A, B, offs, scales, ps, training=True, grad_a=ga, grad_b=gb)
        y = apply_multi_lora(plan, x, base.clone(), seed=1)
    else:
        A = [a.requires_grad_() for a in A]
        B = [b.requires_grad_() for b in B]
        y = fused_multi_lora(x, base.clone(), A, B, offs, scales, dropout_p=ps, training=True, seed=1)
    y.backward(torch.randn_like(y))
    if dev == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = parser.parse_args()
    import_alto_kernels()
    from alto_kernels import fused

    t0 = time.perf_counter()
    cases = 0
    for shape in args.shapes.split(","):
        for K, N in LAYERS[shape]:
            for R, ranks in RANKS.items():
                for T in (int(t) for t in args.tokens.split(",")):
                    for dropout in (0.05,):  # keys without dropout borrow these (a flag apart)
                        t1 = time.perf_counter()
                        run_case(K, N, T, ranks, dropout, sink=False)
                        run_case(K, N, T, ranks, dropout, sink=True)
                        cases += 1
                        print(f"{shape} {K}->{N} R={R} T={T} p={dropout}: {time.perf_counter() - t1:.1f} s",
                              flush=True)
    seconds = time.perf_counter() - t0
    doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "triton": __import__("triton").__version__,
           "torch": torch.__version__, "tuning_seconds": round(seconds, 1), "cases": cases,
           "command": f"python benchmarks/tune_kernels.py --out {args.out} --shapes {args.shapes} --tokens {args.tokens}",
           "kernels": {lau.name: lau.exported() for lau in fused.LAUNCHERS}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"tuned {sum(len(v) for v in doc['kernels'].values())} keys in {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
