"""Do the LoRA kernels' autotune lists hold their best configs? A wider sweep, then an A/B.

For the 8 x 512, rank-16 case at each Llama-8B shape, the shrink, ``lora_bwd_dy`` and
``lora_bwd_dx`` kernels are autotuned over a wide grid of configs (a superset of each kernel's
list), through the real op (``fused_linear_multi_lora`` fwd+bwd). From the same timings the best
config of the committed list and the best of the grid are reported (µs, and the bytes each kernel
must move per µs). Then the op is timed from a CUDA graph (device time) with each launcher pinned
to one choice and then the other, beside the base linear: (b)/(a) with the list as it is and with
the grid's winners.

    python benchmarks/kernel_configs.py --out benchmarks/results/kernel_configs_h100.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

os.environ.setdefault("ALTO_AUTOTUNE", "full")  # every key tunes for itself
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, linear_case  # noqa: E402


def grids():
    """Name -> (kernel module attribute, the wide grid) per swept kernel."""
    from alto_kernels._common import cfg
    shrink = [cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, ROW_SPLIT=False, PREFETCH_A=True, num_warps=w, num_stages=s)
              for bm, bk, sk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8, 16), (4, 8), (3, 4))
              if not (bm == 128 and bk == 256) and not (bm == 32 and w == 8)]
    bwd_dy = [cfg(BLOCK_N=bn, SPLIT_N=sn, PREFETCH_B=True, num_warps=w, num_stages=s)
              for bn, sn, w, s in itertools.product((32, 64, 128, 256), (2, 4, 8, 16), (4, 8), (3, 4, 5))
              if not (bn == 256 and s > 3) and not (bn == 32 and w == 8)]
    bwd_dx = [cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_ROLES=sr, num_warps=w, num_stages=s)
              for bm, bk, sr, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (False, True), (4, 8), (3, 4))
              if not (bm == 128 and bk == 256)]
    return {"lora_shrink": shrink, "lora_bwd_dy": bwd_dy, "lora_bwd_dx": bwd_dx}


def cfg_json(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def same(a, b) -> bool:
    return cfg_json(a) == cfg_json(b)


def kernel_bytes(name: str, T: int, K: int, N: int) -> int:
    """The big-tensor bytes a kernel must move (bf16): shrink and the dX pass read X (the dX pass
    also writes dX), the dY pass reads dY."""
    return {"lora_shrink": 2 * T * K, "lora_bwd_dy": 2 * T * N, "lora_bwd_dx": 4 * T * K}[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    import_alto_kernels()
    from alto_kernels import fused
    launchers = {l.name: l for l in fused.LAUNCHERS}
    wide = grids()
    committed = {name: list(launchers[name].kernel.configs) for name in wide}
    for name, grid in wide.items():  # the committed list is part of the grid
        grid += [c for c in committed[name] if not any(same(c, g) for g in grid)]
        launchers[name].kernel.configs = grid
    n, tok, r, dt = args.adapters, args.tokens, args.rank, torch.bfloat16
    T = n * tok
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "case": f"{n}x{tok} r{r} bf16", "command": "python " + " ".join(sys.argv), "grid_sizes":
           {k: len(v) for k, v in wide.items()}, "shapes": {}}
    for K, N in SHAPES:
        x, W, A, B, dy, op = linear_case(n, tok, r, K, N, dt)

        def base():
            torch.autograd.grad(F.linear(x, W), [x], dy)

        res = {}
        keys = {}
        for name in wide:
            l = launchers[name]
            l.best.clear()
            l.tuned.clear()
            l.kernel.cache.clear()
            l.kernel.configs_timings = None
        # One call autotunes each kernel at its key; keep each kernel's timings as it finishes.
        seen = {}
        for name in wide:
            l = launchers[name]
            orig = l.kernel.run

            def run(*a, _l=l, _orig=orig, _name=name, **kw):
                r_ = _orig(*a, **kw)
                if getattr(_l.kernel, "configs_timings", None) is not None and _name not in seen:
                    seen[_name] = dict(_l.kernel.configs_timings)
                return r_
            l.kernel.run = run
        op()
        torch.cuda.synchronize()
        for name in wide:
            l = launchers[name]
            del l.kernel.run  # the instance attribute; the class's run again
            keys[name] = list(l.tuned)
            t = {c: (v[0] if isinstance(v, (list, tuple)) else v) for c, v in seen.get(name, {}).items()}
            cur = min((c for c in t if any(same(c, k) for k in committed[name])), key=t.get)
            best = min(t, key=t.get)
            nbytes = kernel_bytes(name, T, K, N)
            ranked = sorted(t, key=t.get)[:5]
            res[name] = {"committed_best": cfg_json(cur), "committed_us": t[cur] * 1e3,
                         "grid_best": cfg_json(best), "grid_us": t[best] * 1e3,
                         "committed_tb_s": nbytes / (t[cur] * 1e-3) / 1e12, "grid_tb_s": nbytes / (t[best] * 1e-3) / 1e12,
                         "top5": [{**cfg_json(c), "us": t[c] * 1e3} for c in ranked], "configs_timed": len(t)}
            print(f"[{K}->{N}] {name}: committed best {t[cur] * 1e3:.1f} us ({res[name]['committed_tb_s']:.2f} TB/s) "
                  f"{cfg_json(cur)} | grid best {t[best] * 1e3:.1f} us ({res[name]['grid_tb_s']:.2f} TB/s) "
                  f"{cfg_json(best)} | {len(t)} timed", flush=True)
        # A/B in device time: each tuned key pinned to the committed list's best, then the grid's.
        ab = {"base_ms": triton.testing.do_bench_cudagraph(base, rep=200)}
        for arm in ("committed", "grid"):
            for name in wide:
                l = launchers[name]
                pick = res[name][f"{arm}_best"]
                cfg = next(c for c in l.kernel.configs if cfg_json(c) == pick)
                for k in keys[name]:
                    l.best[k] = cfg
            op()
            torch.cuda.synchronize()
            ab[f"{arm}_ms"] = triton.testing.do_bench_cudagraph(op, rep=200)
        ab["committed_over_base"] = ab["committed_ms"] / ab["base_ms"]
        ab["grid_over_base"] = ab["grid_ms"] / ab["base_ms"]
        print(f"[{K}->{N}] device time: base {ab['base_ms'] * 1e3:.1f} us | (b) committed {ab['committed_ms'] * 1e3:.1f} us "
              f"({ab['committed_over_base']:.3f}) | (b) grid {ab['grid_ms'] * 1e3:.1f} us ({ab['grid_over_base']:.3f})",
              flush=True)
        res["ab"] = ab
        out["shapes"][f"{K}->{N}"] = res
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
