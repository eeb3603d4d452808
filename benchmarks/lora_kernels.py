"""Time forward+backward of a frozen base linear with and without multi-LoRA, per Llama-8B layer shape.

Per case (shape × adapters × tokens/adapter × ranks, bf16, no dropout) the median of
``triton.testing.do_bench`` (warm-up first, rotating random inputs) of:

  (a) base:        y = x Wᵀ (W frozen), grads of x                        — the floor to beat
  (b) fused_linear_op: fused_linear_multi_lora: the base linear and the fused multi-LoRA kernels
                   as one autograd node, grads of x, A_i, B_i              — the headline (b)
  (b-) fused:      (a), then fused_multi_lora in place on its output, grads of x, A_i, B_i
                   (autograd sums the two dX; the delta is a second pass over Y)
  (c) reference:   (a) + multi_lora_reference (the segment loop)
  (d) sequential:  per adapter its own base matmul on its tokens + PEFT-style LoRA, as separate jobs
  (e) lora-only:   fused_multi_lora fwd+bwd without the base (for the bytes-per-second figure)

and the ratios (b)/(a), (c)/(b), (d)/(b) (``*_inplace``: the same against (b-)). Writes JSON (``--out``) and merges the headline
figures into benchmarks/results/summary.json when ``--summary`` is given.

Each variant is timed twice: as called from Python (``do_bench``: what a caller that launches
one layer at a time waits for, host launch cost included) and replayed from a CUDA graph
(``do_bench_cudagraph``, ``graph_ms``: the device time alone, what a step that keeps the GPU
queue full pays, as the engine's 8B step does). At 8 × 512 tokens the first is host-bound for
every variant with LoRA in it, the second is not; the two are reported side by side.

    python benchmarks/lora_kernels.py --out benchmarks/results/kernels_h100.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, make_weights, rotating_inputs  # noqa: E402

RANKS = {"r16": [16], "mixed": [8, 16, 32, 64]}


def lora_bytes(T, K, N, elt=2):
    """Fewest device-memory bytes of the LoRA part of fwd+bwd under the contract: fwd X read,
    Y read+write; bwd dY read, X read, dX write (the autograd sum with the base dX is extra)."""
    return elt * T * (3 * K + 3 * N)


def bench_case(ak, K, N, n_ad, tok, rank_key, do_bench, rep_ms, graph_rep_ms=0, dev="cuda"):
    """One case's timings and ratios (``dev`` "cpu": the tests' smoke run under TRITON_INTERPRET)."""
    from alto_kernels import apply_linear_multi_lora  # the package's: older kernels (host-ab's before arm) have it in fused
    from alto_kernels.fused import apply_multi_lora, fused_multi_lora, prepare_multi_lora
    from alto_kernels.fused_linear import fused_linear_multi_lora
    dt = torch.bfloat16
    ranks = [RANKS[rank_key][i % len(RANKS[rank_key])] for i in range(n_ad)]
    T = n_ad * tok
    offs = [i * tok for i in range(n_ad + 1)]
    scales = [32.0 / r for r in ranks]
    gen = torch.Generator(device=dev).manual_seed(0)
    W = (torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(dt)          # frozen
    A, B = make_weights(ranks, K, N, dt, dev, gen)
    nxt = rotating_inputs(T, K, N, dt, dev, gen)

    def base():
        x, dy = nxt()
        torch.autograd.grad(F.linear(x, W), [x], dy)

    def fused():
        x, dy = nxt()
        y = fused_multi_lora(x, F.linear(x, W), A, B, offs, scales)
        torch.autograd.grad(y, [x, *A, *B], dy)

    def fused_linear_op():
        x, dy = nxt()
        torch.autograd.grad(fused_linear_multi_lora(x, W, A, B, offs, scales), [x, *A, *B], dy)

    # (b') the engine's path: a plan prepared once, dA/dB added into fp32 gradient sinks, so only
    # x and the base output pass through autograd (the sinks keep accumulating, as over micro-steps).
    sink_a = [torch.zeros(a.shape, device=dev) for a in A]
    sink_b = [torch.zeros(b.shape, device=dev) for b in B]
    x0, _ = nxt()
    plan = prepare_multi_lora(x0, F.linear(x0, W).detach(), [a.detach() for a in A], [b.detach() for b in B],
                              offs, scales, grad_a=sink_a, grad_b=sink_b)

    def fused_sink():
        x, dy = nxt()
        y = apply_multi_lora(plan, x, F.linear(x, W))
        torch.autograd.grad(y, [x], dy)

    # (b'') the engine's path where one run covers the rows: the base GEMM inside the same node,
    # the LoRA dX added into dY W by lora_bwd_dx (no autograd add).
    def fused_linear():
        x, dy = nxt()
        torch.autograd.grad(apply_linear_multi_lora(plan, x, W), [x], dy)

    def fused_linear_adds():  # (b'') before its epilogue variant: the LoRA kernels add into the GEMMs' outputs
        x, dy = nxt()
        torch.autograd.grad(apply_linear_multi_lora(plan, x, W, epilogue=False), [x], dy)

    def reference():
        x, dy = nxt()
        y = F.linear(x, W) + ak.multi_lora_reference(x, A, B, offs, scales)
        torch.autograd.grad(y, [x, *A, *B], dy)

    def sequential():
        x, dy = nxt()
        for i in range(n_ad):  # separate jobs: own leaf input, own base matmul, own backward
            xi = x[offs[i]:offs[i + 1]].detach().requires_grad_()
            yi = F.linear(xi, W) + F.linear(F.linear(xi, A[i]), B[i]) * scales[i]
            torch.autograd.grad(yi, [xi, A[i], B[i]], dy[offs[i]:offs[i + 1]])

    out_buf = torch.randn(T, N, device=dev, generator=gen).to(dt)

    def lora_only():
        x, dy = nxt()
        y = fused_multi_lora(x, out_buf.detach(), A, B, offs, scales)  # detach: drop last call's graph
        torch.autograd.grad(y, [x, *A, *B], dy)

    res = {}
    for name, fn in (("base", base), ("fused_linear_op", fused_linear_op), ("fused", fused),
                     ("fused_sink", fused_sink), ("fused_linear", fused_linear),
                     ("fused_linear_adds", fused_linear_adds),
                     ("reference", reference),
                     ("sequential", sequential), ("lora_only", lora_only)):
        fn()  # autotune / warm-up outside the timing
        if dev == "cuda":
            torch.cuda.synchronize()
        res[name] = do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
    graph = {}
    if graph_rep_ms:  # device time: each variant captured (unrolled, rotating inputs) and replayed
        from triton.testing import do_bench_cudagraph
        for name, fn in (("base", base), ("fused_linear_op", fused_linear_op), ("fused", fused),
                         ("fused_sink", fused_sink), ("fused_linear", fused_linear),
                         ("fused_linear_adds", fused_linear_adds),
                         ("reference", reference), ("sequential", sequential), ("lora_only", lora_only)):
            try:
                graph[name] = do_bench_cudagraph(fn, rep=graph_rep_ms, return_mode="median")
            except Exception as err:  # noqa: BLE001 - a variant that cannot be captured loses its column only
                print(f"graph timing of {name} failed: {type(err).__name__}: {err}", flush=True)
                graph = {}
                break
    from alto_kernels import _common
    if _common.DIRECT_LAUNCH:  # A/B in the same run: the same calls through Triton's own dispatch
        _common.DIRECT_LAUNCH = False
        try:
            for name, fn in (("fused_jit_dispatch", fused), ("fused_sink_jit_dispatch", fused_sink)):
                fn()
                torch.cuda.synchronize()
                res[name] = do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
        finally:
            _common.DIRECT_LAUNCH = True
    return {
        "shape": f"{K}->{N}", "in": K, "out": N, "adapters": n_ad, "tokens_per_adapter": tok, "tokens": T,
        "ranks": rank_key, "rank_list": ranks, "dtype": "bfloat16", "dropout": 0.0,
        "median_ms": {k: round(v, 4) for k, v in res.items()}, **ratios(res, T, K, N),
        "lora_only_bytes_floor_us_at_3TBps": round(lora_bytes(T, K, N) / 3.0e12 * 1e6, 1),
        **({"graph_ms": {k: round(v, 4) for k, v in graph.items()}, **ratios(graph, T, K, N, "_graph")} if graph else {}),
    }


def ratios(ms: dict, T: int, K: int, N: int, suffix: str = "") -> dict:
    """The case's ratios from one set of timings (``suffix`` names the set)."""
    pairs = {"fused_over_base": ("fused_linear_op", "base"), "fused_inplace_over_base": ("fused", "base"),
             "fused_sink_over_base": ("fused_sink", "base"),
             "fused_linear_over_base": ("fused_linear", "base"), "reference_over_fused": ("reference", "fused_linear_op"),
             "reference_over_fused_inplace": ("reference", "fused"),
             "fused_linear_adds_over_base": ("fused_linear_adds", "base"),
             "sequential_over_fused": ("sequential", "fused_linear_op"),
             "sequential_over_fused_inplace": ("sequential", "fused")}
    out = {k + suffix: round(ms[a] / ms[b], 4) for k, (a, b) in pairs.items()}
    out["lora_only_achieved_TBps" + suffix] = round(lora_bytes(T, K, N) / (ms["lora_only"] * 1e-3) / 1e12, 3)
    return out


def profile_hot(ak, K=4096, N=4096, n_ad=8, tok=512, rank=16):
    """Per-kernel device time of one fwd+bwd of the hot case (after autotuning): the base alone,
    (b) ``fused_linear_multi_lora`` and (b'') the engine's one-node path, so that what each adds
    over the base shows kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile
    from alto_kernels import apply_linear_multi_lora
    from alto_kernels.fused import prepare_multi_lora
    from alto_kernels.fused_linear import fused_linear_multi_lora
    dt, T = torch.bfloat16, n_ad * tok
    offs, scales = [i * tok for i in range(n_ad + 1)], [2.0] * n_ad
    A, B = make_weights([rank] * n_ad, K, N, dt, "cuda", None)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    x = torch.randn(T, K, device="cuda", dtype=dt).requires_grad_()
    dy = torch.randn(T, N, device="cuda", dtype=dt)
    sinks = [torch.zeros(w.shape, device="cuda") for w in (*A, *B)]
    plan = prepare_multi_lora(x, torch.empty(T, N, device="cuda", dtype=dt), [a.detach() for a in A],
                              [b.detach() for b in B], offs, scales, grad_a=sinks[:n_ad], grad_b=sinks[n_ad:])
    steps = {
        "base": lambda: torch.autograd.grad(F.linear(x, W), [x], dy),
        "(b) fused_linear_multi_lora": lambda: torch.autograd.grad(
            fused_linear_multi_lora(x, W, A, B, offs, scales), [x, *A, *B], dy),
        "(b'') one-node sink path": lambda: torch.autograd.grad(apply_linear_multi_lora(plan, x, W), [x], dy),
    }
    for name, step in steps.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"--- {K}->{N} {n_ad}x{tok} r{rank}: {name} (10 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    from alto_kernels.fused import LAUNCHERS
    for launcher in LAUNCHERS:  # the configs these calls launched (table, borrowed or tuned here)
        for key, config in launcher.best.items():
            if key.dim in (K, N) and key.R == 16 and key.t_hint == T:
                print(f"{launcher.name} flags={key.flags} dim={key.dim}: {config}")


def gmean(xs):
    return math.exp(sum(math.log(v) for v in xs) / len(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernels_h100.json")
    ap.add_argument("--summary", default=None, help="summary.json to merge the headline figures into")
    ap.add_argument("--quick", action="store_true", help="only the 8x512 cases")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--graph-rep-ms", type=int, default=50,
                    help="per CUDA-graph replay when timing device time (0: skip the graph timings)")
    ap.add_argument("--merge-only", action="store_true", help="merge --out's headline into --summary and stop")
    ap.add_argument("--profile", action="store_true", help="print a per-kernel profile of the hot case first")
    ap.add_argument("--profile-only", action="store_true", help="with --profile: stop after the profiles")
    ap.add_argument("--chunks", default="", help="e.g. 64,128,256: time the hot case per chunk size first")
    args = ap.parse_args()
    if args.merge_only:
        with open(args.out) as f:
            merge_summary(args.summary, {f"kernel.{k}": v for k, v in json.load(f)["headline"].items()})
        return
    import triton
    from triton.testing import do_bench
    ak = import_alto_kernels()
    # The environment that changes what runs (autotune mode, rows per chunk) is part of the command.
    env = " ".join(f"{v}={os.environ[v]}" for v in ("ALTO_AUTOTUNE", "ALTO_LORA_CHUNK") if v in os.environ)
    cmd = (f"env {env} " if env else "") + "python benchmarks/lora_kernels.py " + " ".join(sys.argv[1:])
    dev_name = torch.cuda.get_device_name()
    cases = []
    t0 = time.time()
    if args.profile:
        for K, N in SHAPES:
            profile_hot(ak, K, N)
        if args.profile_only:
            return
    for ch in [int(v) for v in args.chunks.split(",") if v]:
        import alto_kernels._common as common
        default, common.CHUNK_ROWS = common.CHUNK_ROWS, ch
        c = bench_case(ak, 4096, 4096, 8, 512, "r16", do_bench, args.rep_ms)
        print(f"chunk {ch}: fused {c['median_ms']['fused']:.4f} ms, lora-only {c['median_ms']['lora_only']:.4f} ms")
        common.CHUNK_ROWS = default
    grid = [(8, 512)] if args.quick else [(8, 512), (8, 2048), (32, 512), (32, 2048)]
    for K, N in SHAPES:
        for n_ad, tok in grid:
            for rk in ("r16", "mixed"):
                c = bench_case(ak, K, N, n_ad, tok, rk, do_bench, args.rep_ms, args.graph_rep_ms)
                cases.append(c)
                m = c["median_ms"]
                print(f"{c['shape']:>11} {n_ad:>2}x{tok:<4} {rk:>5}  base {m['base']:.3f}  op {m['fused_linear_op']:.3f}"
                      f"  in-place {m['fused']:.3f}"
                      f"  sink {m['fused_sink']:.3f}  one-node {m['fused_linear']:.3f} ({m['fused_linear_adds']:.3f} adds)"
                      f"  ref {m['reference']:.3f}  seq {m['sequential']:.3f}  lora {m['lora_only']:.3f} ms"
                      f"  | b/a {c['fused_over_base']:.3f}  c/b {c['reference_over_fused']:.2f}"
                      f"  d/b {c['sequential_over_fused']:.2f}  lora {c['lora_only_achieved_TBps']:.2f} TB/s",
                      flush=True)
                if "graph_ms" in c:
                    g = c["graph_ms"]
                    print(f"{'graph':>11} {'':7} {'':5}  base {g['base']:.3f}  op {g['fused_linear_op']:.3f}"
                          f"  in-place {g['fused']:.3f}"
                          f"  sink {g['fused_sink']:.3f}  one-node {g['fused_linear']:.3f} ({g['fused_linear_adds']:.3f} adds)"
                          f"  ref {g['reference']:.3f}  seq {g['sequential']:.3f}  lora {g['lora_only']:.3f} ms"
                          f"  | b/a {c['fused_over_base_graph']:.3f}  c/b {c['reference_over_fused_graph']:.2f}"
                          f"  d/b {c['sequential_over_fused_graph']:.2f}  lora {c['lora_only_achieved_TBps_graph']:.2f} TB/s",
                          flush=True)
    hot = [c for c in cases if c["adapters"] == 8 and c["tokens_per_adapter"] == 512 and c["ranks"] == "r16"]
    note = ("8 adapters x 512 tokens, rank 16, bf16, no dropout; geometric mean over the three Llama-8B "
            "layer shapes 4096->4096, 4096->14336, 14336->4096 (per-shape figures in kernels JSON)")
    headline = {k: {"value": round(gmean([c[k] for c in hot]), 4), "device": dev_name, "command": cmd,
                    "note": note, "per_shape": {c["shape"]: c[k] for c in hot}}
                for k in ("fused_over_base", "reference_over_fused", "sequential_over_fused")}
    # Not issue figures: the engine's paths (gradient sink, one node), beside (b) for the same case.
    extra = {k: {"value": round(gmean([c[k] for c in hot]), 4), "device": dev_name, "command": cmd,
                 "note": note + "; the engine's own path, not (b): " + result_variants()[k.replace("_over_base", "")],
                 "per_shape": {c["shape"]: c[k] for c in hot}}
             for k in ("fused_sink_over_base", "fused_linear_over_base", "fused_linear_adds_over_base")}
    # (b-): the in-place op on a base output someone else computed, beside the headline (b).
    inplace = {k: {"value": round(gmean([c[k] for c in hot]), 4), "device": dev_name, "command": cmd,
                   "note": note + "; against (b-): " + result_variants()["fused"],
                   "per_shape": {c["shape"]: c[k] for c in hot}}
               for k in ("fused_inplace_over_base", "reference_over_fused_inplace", "sequential_over_fused_inplace")}
    # The same ratios in device time (CUDA-graph replay, no host launch cost): named figures of
    # their own beside the issue's, never in their place.
    device_time = {}
    if hot and "graph_ms" in hot[0]:
        gnote = note + "; device time: each variant captured in a CUDA graph and replayed (no host launch cost)"
        device_time = {f"{k}_graph": {"value": round(gmean([c[f"{k}_graph"] for c in hot]), 4), "device": dev_name,
                                      "command": cmd, "note": gnote,
                                      "per_shape": {c["shape"]: c[f"{k}_graph"] for c in hot}}
                       for k in ("fused_over_base", "reference_over_fused", "sequential_over_fused",
                                 "fused_inplace_over_base", "fused_sink_over_base", "fused_linear_over_base")}
    result = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__, "command": cmd,
              "timing": "triton.testing.do_bench median, ms, fwd+bwd, warm-up and autotune before timing, "
                        "rotating random inputs; graph_ms: triton.testing.do_bench_cudagraph median (the same "
                        "calls captured unrolled in one CUDA graph and replayed: device time, no host cost)",
              "variants": result_variants(),
              "direct_launch": _common_direct(),
              "headline": headline, "inplace": inplace, "engine_path": extra, "device_time": device_time, "cases": cases, "seconds": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.summary:
        merge_summary(args.summary, {f"kernel.{k}": v for k, v in (*headline.items(), *device_time.items(),
                                                                   *inplace.items(),
                                                                   ("fused_linear_over_base",
                                                                    extra["fused_linear_over_base"]))})
    for k, v in (*headline.items(), *inplace.items(), *device_time.items()):
        print(f"kernel.{k} = {v['value']}  {v['per_shape']}")
    print(f"engine path (gradient sink): {extra}")
    from alto_kernels.fused import LAUNCHERS
    for launcher in LAUNCHERS:  # what each key ran with (autotuned here, from the table, or borrowed)
        for key, config in sorted(launcher.best.items(), key=lambda kc: (kc[0].dim, kc[0].R, kc[0].t_hint)):
            print(f"config {launcher.name} dim={key.dim} R={key.R} t={key.t_hint} flags={key.flags}: "
                  f"{dict(config.kwargs)} w{config.num_warps} s{config.num_stages}")


def result_variants() -> dict:
    return {"base": "(a) frozen base linear, fwd + input grad",
            "fused_linear_op": "(b) fused_linear_multi_lora: the frozen base linear and the fused multi-LoRA "
                               "kernels as one autograd node, grads of x and every A_i, B_i (the headline (b))",
            "fused": "(b-) base, then fused_multi_lora in place on its output (autograd sums the two dX)",
            "fused_sink": "(b') base + the engine's path: prepared plan, dA/dB into fp32 gradient sinks",
            "fused_linear_adds": "(b'') with the LoRA kernels adding into the base GEMMs' outputs "
                                 "(lora_expand in place, lora_bwd_dx with ADD_DX; epilogue=False)",
            "fused_linear": "(b'') the engine's one-node path: base GEMM and LoRA in one autograd node, "
                            "the GEMMs adding into the LoRA deltas (addmm_; apply_linear_multi_lora)",
            "reference": "(c) base + multi_lora_reference",
            "sequential": "(d) one adapter at a time: own base matmul + PEFT-style LoRA",
            "lora_only": "(e) fused_multi_lora alone (no base)",
            "fused_jit_dispatch": "(b-) with every launch through Triton's JITFunction.run "
                                  "(ALTO_DIRECT_LAUNCH=0), same run",
            "fused_sink_jit_dispatch": "(b') likewise"}


def _common_direct() -> bool:
    from alto_kernels import _common
    return bool(_common.DIRECT_LAUNCH)


def merge_summary(path, figures):
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(figures)
    with open(path, "w") as f:  # written as engine.py and allocator.py write it (diffs stay small)
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
