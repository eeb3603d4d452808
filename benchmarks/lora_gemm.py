"""The one-node linear with its own Triton GEMMs (LoRA expand in the epilogue) against cuBLAS.

Per Llama-8B layer shape, 8 adapters x 512 tokens, ranks r16 and mixed {8,16,32,64}, bf16, no
dropout, a gradient-sink plan as the engine uses. Timed as called (``do_bench``) and as device
time (``do_bench_cudagraph``), medians in ms, every arm in the same process:

  base       y = x Wᵀ, grads of x (cuBLAS)                               — (a) of lora_kernels.py
  epilogue   apply_linear_multi_lora: LoRA kernels store deltas, cuBLAS addmm_ adds into them
  gemm       apply_linear_multi_lora(gemm=True): lora_gemm_kernel with the expand in its epilogue
  and the GEMMs alone: cublas_fwd (x Wᵀ), gemm_fwd (lora_gemm, forward), cublas_bwd (dY W),
  gemm_bwd (lora_gemm, backward)

First it checks Y, dX, dA and dB of ``gemm`` against an fp32 reference (and ``epilogue``'s errors
beside them). Writes JSON (``--out``). ``--flatten off`` leaves out the configs that flatten the
tile and K loops (the A/B for them).

    python benchmarks/lora_gemm.py --out benchmarks/results/lora_gemm_h100.json
    python benchmarks/lora_gemm.py --flatten off --ranks r16 --out benchmarks/results/lora_gemm_h100_noflat.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, make_weights, rel, rotating_inputs  # noqa: E402

RANKS = {"r16": [16], "mixed": [8, 16, 32, 64]}


def setup(K, N, n_ad, tok, rank_key, gen, lens=None):
    from alto_kernels.fused import prepare_multi_lora
    dev, dt = "cuda", torch.bfloat16
    lens = lens or [tok] * n_ad
    ranks = [RANKS[rank_key][i % len(RANKS[rank_key])] for i in range(len(lens))]
    offs = [sum(lens[:i]) for i in range(len(lens) + 1)]
    T = offs[-1]
    scales = [32.0 / r for r in ranks]
    W = (torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(dt)
    A, B = make_weights(ranks, K, N, dt, dev, gen)
    A, B = [a.detach() for a in A], [b.detach() for b in B]
    sink_a = [torch.zeros(a.shape, device=dev) for a in A]
    sink_b = [torch.zeros(b.shape, device=dev) for b in B]
    x0 = torch.randn(T, K, device=dev, generator=gen).to(dt)
    plan = prepare_multi_lora(x0, torch.empty(T, N, device=dev, dtype=dt), A, B, offs, scales,
                              grad_a=sink_a, grad_b=sink_b)
    return dict(W=W, A=A, B=B, offs=offs, scales=scales, plan=plan, sinks=sink_a + sink_b, T=T)


def check(case, gen):
    """Relative errors of Y, dX and the sinks against fp32 math on the same bf16 values."""
    from alto_kernels.fused_linear import apply_linear_multi_lora
    W, A, B, offs, scales, plan, T = (case[k] for k in ("W", "A", "B", "offs", "scales", "plan", "T"))
    K, N = W.shape[1], W.shape[0]
    x = torch.randn(T, K, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(T, N, device="cuda", generator=gen).to(torch.bfloat16)
    xf = x.float().requires_grad_()
    Af = [a.float().requires_grad_() for a in A]
    Bf = [b.float().requires_grad_() for b in B]
    y_ref = xf @ W.float().t()
    y_ref = y_ref + torch.cat([s * (xf[lo:hi] @ a.t()) @ b.t()
                               for a, b, s, lo, hi in zip(Af, Bf, scales, offs, offs[1:])])
    want = torch.autograd.grad(y_ref, [xf, *Af, *Bf], dy.float())
    out = {}
    for arm, kw in (("epilogue", {}), ("gemm", {"gemm": True})):
        for s in case["sinks"]:
            s.zero_()
        xs = x.clone().requires_grad_()
        y = apply_linear_multi_lora(plan, xs, W, **kw)
        (dx,) = torch.autograd.grad(y, [xs], dy)
        torch.cuda.synchronize()
        out[arm] = {"y": rel(y, y_ref), "dx": rel(dx, want[0]),
                    "dA_dB": max(rel(s, w) for s, w in zip(case["sinks"], want[1:]))}
    for s in case["sinks"]:
        s.zero_()
    return out


def bench_case(K, N, n_ad, tok, rank_key, rep_ms, graph_rep_ms, gen):
    from alto_kernels.fused_linear import apply_linear_multi_lora, lora_gemm
    from triton.testing import do_bench, do_bench_cudagraph
    case = setup(K, N, n_ad, tok, rank_key, gen)
    W, plan, T = case["W"], case["plan"], case["T"]
    errors = check(case, gen)
    nxt = rotating_inputs(T, K, N, torch.bfloat16, "cuda", gen)
    h = torch.randn(T, plan.R, device="cuda", generator=gen) * 0.1

    def base():
        x, dy = nxt()
        torch.autograd.grad(F.linear(x, W), [x], dy)

    def epilogue():
        x, dy = nxt()
        torch.autograd.grad(apply_linear_multi_lora(plan, x, W), [x], dy)

    def gemm():
        x, dy = nxt()
        torch.autograd.grad(apply_linear_multi_lora(plan, x, W, gemm=True), [x], dy)

    def cublas_fwd():
        x, _ = nxt()
        torch.mm(x.detach(), W.t())

    def gemm_fwd():
        x, _ = nxt()
        lora_gemm(plan, x.detach(), W, h, forward=True)

    def cublas_bwd():
        _, dy = nxt()
        torch.mm(dy, W)

    def gemm_bwd():
        _, dy = nxt()
        lora_gemm(plan, dy, W, h, forward=False)

    arms = (("base", base), ("epilogue", epilogue), ("gemm", gemm), ("cublas_fwd", cublas_fwd),
            ("gemm_fwd", gemm_fwd), ("cublas_bwd", cublas_bwd), ("gemm_bwd", gemm_bwd))
    called, graph = {}, {}
    for name, fn in arms:
        fn()
        torch.cuda.synchronize()
        called[name] = do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
    for name, fn in arms:
        try:
            graph[name] = do_bench_cudagraph(fn, rep=graph_rep_ms, return_mode="median")
        except Exception as err:  # noqa: BLE001 - a variant that cannot be captured loses its column only
            print(f"graph timing of {name} failed: {type(err).__name__}: {err}", flush=True)
    for s in case["sinks"]:
        s.zero_()
    fl = 2.0 * T * K * N
    row = {"shape": f"{K}->{N}", "adapters": n_ad, "tokens_per_adapter": tok, "ranks": rank_key,
           "errors": errors, "ms": called, "graph_ms": graph,
           "tflops_graph": {k: fl / graph[k] / 1e9 for k in ("cublas_fwd", "gemm_fwd", "cublas_bwd", "gemm_bwd")
                            if k in graph}}
    for d, src in (("", called), ("graph_", graph)):
        if all(k in src for k in ("base", "epilogue", "gemm")):
            row[d + "epilogue_over_base"] = src["epilogue"] / src["base"]
            row[d + "gemm_over_base"] = src["gemm"] / src["base"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lora_gemm_h100.json")
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--graph-rep", type=int, default=200)
    ap.add_argument("--ranks", default="r16,mixed")
    ap.add_argument("--flatten", choices=("auto", "off"), default="auto",
                    help="off: autotune lora_gemm without the flattened (tile x K loop) configs")
    a = ap.parse_args()
    import_alto_kernels()
    from alto_kernels import lora_gemm as lg
    lg.FLATTEN_OK = a.flatten == "auto"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    t0 = time.time()
    # Segments that do not line up with the row tiles (up to 4 in a tile, one empty): errors only.
    from alto_kernels.fused_linear import _segment_tables
    uneven = setup(4096, 4096, 0, 0, "mixed", gen, lens=[389, 0, 1024, 77, 640, 1, 900, 1065])
    uneven_errors = check(uneven, gen)
    print("uneven segments (SEGS=%d):" % _segment_tables(uneven["plan"])[2], uneven_errors, flush=True)
    worst = max(max(e.values()) for e in uneven_errors.values())
    if worst > 1e-2:
        raise SystemExit(f"lora_gemm is wrong on uneven segments: {uneven_errors}")
    for K, N in SHAPES:
        for rk in a.ranks.split(","):
            row = bench_case(K, N, 8, 512, rk, a.rep, a.graph_rep, gen)
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in ("ms", "graph_ms")}), flush=True)
            print("  as called:", {k: round(v, 3) for k, v in row["ms"].items()}, flush=True)
            print("  graph    :", {k: round(v, 3) for k, v in row["graph_ms"].items()}, flush=True)
    best = {str(k): str(v) for k, v in getattr(lg.lora_gemm_kernel, "cache", {}).items()}
    gm = lambda key: math.exp(sum(math.log(r[key]) for r in rows if r["ranks"] == "r16" and key in r) /
                              max(1, sum(1 for r in rows if r["ranks"] == "r16" and key in r)))
    summary = {k: gm(k) for k in ("epilogue_over_base", "gemm_over_base", "graph_epilogue_over_base",
                                  "graph_gemm_over_base")}
    print("geomean over the three shapes, 8x512 r16:", summary, flush=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "git": git,
           "command": "python benchmarks/lora_gemm.py " + " ".join(sys.argv[1:]), "seconds": time.time() - t0,
           "geomean_8x512_r16": summary, "uneven_segments_errors": uneven_errors, "rows": rows,
           "gemm_configs": best}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
