"""The candidate configs on a GPU: correct, and faster in (b)? One call decides both.

Candidates are configs that a probe found faster but that the kernels themselves have not yet run
on a GPU (``_common.CANDIDATE_CONFIGS``): the shrink split over rows with A_i's tiles left to the
pipeliner (``lora_shrink.ROW_SPLIT_CONFIGS``), the dY pass without B_i's hand look-ahead
(``lora_bwd_dy.PIPELINED_B_CONFIGS``) and the dX pass with dX and dA on programs of their own
(``lora_bwd_dx.SPLIT_ROLES_CONFIGS``). Per Llama-8B shape, 8 adapters x 512 tokens, rank 16, bf16:

1. (b) (``fused_linear_multi_lora`` fwd+bwd) with the table's configs: y and every gradient kept,
   with and without dropout 0.1 (same seed);
2. the same with the kernel pinned to each candidate in turn: the largest difference from (1) in
   each output, and (b) in device time (CUDA-graph replay) beside the base linear's;
3. every kernel whose fastest candidate beat its table config pinned to that candidate, at once.

    python benchmarks/candidates.py --out benchmarks/results/candidates_h100.json
    TRITON_INTERPRET=1 python benchmarks/candidates.py --smoke   # tiny, CPU: the script itself runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.runtime.errors
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, linear_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    args = ap.parse_args()
    dev, dt, shapes = "cuda", torch.bfloat16, SHAPES
    if args.smoke:
        dev, dt, shapes = "cpu", torch.float32, [(40, 24)]
        args.adapters, args.tokens, args.rank = 3, 20, 8

    def timed(fn) -> float:  # us of one call in device time (CUDA-graph replay); --smoke: runs it once
        if args.smoke:
            fn()
            return 1.0
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms) * 1e3

    import_alto_kernels()
    from alto_kernels import fused
    from alto_kernels.fused_linear import fused_linear_multi_lora
    from alto_kernels.lora_bwd_dx import SPLIT_ROLES_CONFIGS
    from alto_kernels.lora_bwd_dy import PIPELINED_B_CONFIGS
    from alto_kernels.lora_shrink import ROW_SPLIT_CONFIGS

    candidates = {fused._SHRINK: ROW_SPLIT_CONFIGS, fused._BWD_DY: PIPELINED_B_CONFIGS,
                  fused._BWD_DX: SPLIT_ROLES_CONFIGS}
    n, tok, r = args.adapters, args.tokens, args.rank
    offs, scales = [i * tok for i in range(n + 1)], [2.0] * n
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__, "triton": triton.__version__,
           "case": f"{n}x{tok} r{r} bf16", "command": "python " + " ".join(sys.argv), "shapes": {}}
    print(out["device"], out["case"], flush=True)
    for K, N in shapes:
        x, W, A, B, dy, op = linear_case(n, tok, r, K, N, dt, dev)
        leaves = [x, *A, *B]

        def outputs(p):
            y = fused_linear_multi_lora(x, W, A, B, offs, scales, dropout_p=None if p is None else [p] * n,
                                        training=p is not None, seed=5)
            return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

        def base():
            torch.autograd.grad(F.linear(x, W), [x], dy)

        want = {p: outputs(p) for p in (None, 0.1)}  # the table's configs (keys now in each launcher)
        pinned = {lau: list(lau.best) for lau in candidates}
        table = {lau: {k: lau.best[k] for k in keys} for lau, keys in pinned.items()}
        res = {"base_us": timed(base), "table_us": timed(op)}
        print(f"[{K}->{N}] base {res['base_us']:.1f} us, (b) with the table's configs {res['table_us']:.1f} us "
              f"({res['table_us'] / res['base_us']:.3f})", flush=True)
        best = {}
        for lau, cands in candidates.items():
            rows = []
            for c in cands:
                for k in pinned[lau]:
                    lau.best[k] = c
                diffs = {}
                config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                try:
                    for p in (None, 0.1):
                        got = outputs(p)
                        diffs[f"dropout {p}"] = max((g.float() - w.float()).abs().max().item()
                                                    / max(w.float().abs().max().item(), 1e-12)
                                                    for g, w in zip(got, want[p]))
                    us = timed(op)
                except triton.runtime.errors.OutOfResources as err:  # more shared memory than the GPU has
                    rows.append({"config": config, "error": str(err)})
                    print(f"[{K}->{N}] {lau.name} {config}: cannot launch: {err}", flush=True)
                    continue
                row = {"config": config, "us": us, "over_base": us / res["base_us"], "max_rel_diff": diffs}
                rows.append(row)
                print(f"[{K}->{N}] {lau.name} {row['config']}: (b) {us:.1f} us ({row['over_base']:.3f}), "
                      f"max rel diff from the table's {diffs}", flush=True)
            for k, c in table[lau].items():  # back to the table's
                lau.best[k] = c
            ran = [i for i, row in enumerate(rows) if "us" in row]
            pick = min(ran, key=lambda i: rows[i]["us"]) if ran else None
            if pick is not None and rows[pick]["us"] < res["table_us"]:  # only one that beat the table's config
                best[lau] = cands[pick]
            res[lau.name] = rows
        for lau, c in best.items():
            for k in pinned[lau]:
                lau.best[k] = c
        op()
        res["fastest_us"] = timed(op)
        res["fastest"] = sorted(lau.name for lau in best)
        print(f"[{K}->{N}] the fastest candidates of {res['fastest']}: (b) {res['fastest_us']:.1f} us "
              f"({res['fastest_us'] / res['base_us']:.3f}) "
              f"against {res['table_us'] / res['base_us']:.3f} with the table's", flush=True)
        for lau in candidates:
            for k, c in table[lau].items():
                lau.best[k] = c
        out["shapes"][f"{K}->{N}"] = res
    ratios = [(s["table_us"] / s["base_us"], s["fastest_us"] / s["base_us"]) for s in out["shapes"].values()]
    gm = [float(torch.tensor([rt[i] for rt in ratios]).log().mean().exp()) for i in (0, 1)]
    out["fused_over_base_graph"] = {"table": gm[0], "candidates": gm[1]}
    print(f"(b)/(a) in device time, geometric mean: table {gm[0]:.3f}, fastest candidates {gm[1]:.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
