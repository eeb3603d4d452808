"""An experiment: the forward shrink split over rows instead of over K, against the production one.

The production ``lora_shrink`` gives each program one 128-row chunk and a 1/SPLIT_K slice of the
input features; the splits' partial sums meet on a ticket (the last split adds the others'), a
serial tail after the stream of X. At 8 x 512 tokens it moves X at 1.4 TB/s (K = 4096) and 2.0
TB/s (K = 14336), and no config of a wide grid did better (``kernel_configs.py``). Here each
program owns ``BLOCK_M`` rows of a chunk and all of K: no partial sums, no ticket, no second
buffer; the price is that every program reads all of ``A_i`` (from L2). No dropout (a probe).

    python benchmarks/shrink_rows.py [--tokens 512 --adapters 8 --rank 16]

Prints, per Llama-8B shape, the largest difference from the production H and the device time
(CUDA-graph replay, X rotated over buffers larger than L2) of the production shrink and of each
row-split config.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import SHAPES, import_alto_kernels, make_weights  # noqa: E402

import_alto_kernels()
from alto_kernels._common import chunk_meta, mma, weight_ptrs  # noqa: E402


@triton.jit
def shrink_rows_kernel(x_ptr, h_ptr, meta_ptr, ptrs_ptr, w_ref, K, stride_xm, R: tl.constexpr,
                       ALIGN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, PREFETCH_A: tl.constexpr):
    pid = tl.program_id(0)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    m0 = lo + tl.program_id(1) * BLOCK_M
    if m0 < hi:
        a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        rr = tl.arange(0, R)
        r_ok = rr < rank
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        if PREFETCH_A:
            a_next = tl.load(a_ptr + rr[None, :] * K + kk[:, None], mask=r_ok[None, :] & (kk < K)[:, None], other=0.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + kk
            if PREFETCH_A:
                a = a_next
                nxt = cols + BLOCK_K
                a_next = tl.load(a_ptr + rr[None, :] * K + nxt[:, None], mask=r_ok[None, :] & (nxt < K)[:, None],
                                 other=0.0)
            else:
                a = tl.load(a_ptr + rr[None, :] * K + cols[:, None], mask=r_ok[None, :] & (cols < K)[:, None],
                            other=0.0)
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :],
                        mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
            acc = mma(x, a.to(x.dtype), acc, DOT_PREC)
        tl.store(h_ptr + rows64[:, None] * R + rr[None, :], acc * c, mask=row_ok[:, None])


CONFIGS = [dict(BLOCK_M=bm, BLOCK_K=bk, PREFETCH_A=pf, num_warps=w, num_stages=s)
           for bm, bk, pf, w, s in [(16, 256, True, 4, 3), (16, 256, False, 4, 4), (16, 128, False, 4, 4),
                                    (16, 512, False, 4, 3), (32, 256, True, 4, 3), (32, 256, False, 4, 4),
                                    (32, 128, False, 4, 5), (32, 256, False, 8, 3), (64, 128, False, 4, 4),
                                    (64, 256, False, 8, 3), (16, 256, False, 2, 4), (32, 128, True, 4, 4)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from alto_kernels import _common
    from alto_kernels.fused import _SHRINK, _dot_prec, _key, _lora_forward, _seed_and_drop, cached_plan
    from alto_kernels.lora_shrink import ROW_SPLIT_CONFIGS

    n, tok, r, dt = args.adapters, args.tokens, args.rank, torch.bfloat16
    T = n * tok
    offs, scales = [i * tok for i in range(n + 1)], [2.0] * n
    print(torch.cuda.get_device_name(0), f"{n}x{tok} r{r} bf16", flush=True)
    for K, N in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        A, B = make_weights([r] * n, K, N, dt, "cuda", gen)
        A = [a.detach() for a in A]
        B = [b.detach() for b in B]
        copies = max(2, -(-(160 << 20) // (T * K * 2)))  # rotate X over > L2 (50 MB) worth of buffers
        xs = [torch.randn(T, K, device="cuda", dtype=dt, generator=gen) for _ in range(copies)]
        plan = cached_plan(xs[0], None, A, B, offs, scales, None, False)
        seed, drop = _seed_and_drop(plan, xs[0], 0, None, None)
        want, _ = _lora_forward(plan, xs[0], None, seed, drop, A[0])
        h = torch.empty(T, plan.R, device="cuda", dtype=torch.float32)
        nc = plan.table.shape[0]

        def rows(cfg, x):
            kw = dict(cfg)
            grid = (nc, triton.cdiv(plan.chunk, kw["BLOCK_M"]))
            shrink_rows_kernel[grid](x, h, plan.table, plan.ptrs, A[0], K, x.stride(0), R=plan.R,
                                     ALIGN=plan.table_align, DOT_PREC="tf32", **kw)

        def prod_all():
            for x in xs:
                _lora_forward(plan, x, None, seed, drop, A[0])

        t_prod = triton.testing.do_bench_cudagraph(prod_all, rep=100) / copies * 1e3
        gb = T * K * 2 / 1e9
        print(f"[{K}->{N}] production shrink {t_prod:.1f} us ({gb / t_prod * 1e3:.2f} TB/s), "
              f"{copies} X buffers", flush=True)
        for cfg in CONFIGS:
            try:
                rows(cfg, xs[0])
                torch.cuda.synchronize()
                err = (h - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
                t = triton.testing.do_bench_cudagraph(lambda: [rows(cfg, x) for x in xs], rep=100) / copies * 1e3
                print(f"[{K}->{N}] rows {cfg}: {t:.1f} us ({gb / t * 1e3:.2f} TB/s) x{t_prod / t:.2f}, "
                      f"rel err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile: say so, go on
                print(f"[{K}->{N}] rows {cfg}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
        # The production kernel pinned to each of its ROW_SPLIT configs, against its table config
        # (the H above); then with dropout 0.1, against the table config's H for the same seed.
        row_cfgs = ROW_SPLIT_CONFIGS  # candidates: in the autotune list only with ALTO_CANDIDATE_CONFIGS=1
        for p in (None, [0.1] * n):
            dplan = plan if p is None else cached_plan(xs[0], None, A, B, offs, scales, p, True)
            dseed, ddrop = _seed_and_drop(dplan, xs[0], 7, None, None)
            key = _key(dt, A[0].dtype, _dot_prec(dt), dplan, K, dplan.has_dropout,
                       *((True,) if _common.SHRINK_TICKETS else ()))
            ref_h, _ = _lora_forward(dplan, xs[0], None, dseed, ddrop, A[0])  # the table's config
            table_cfg = _SHRINK.best.get(key)
            for cfg in row_cfgs:
                _SHRINK.best[key] = cfg
                got, _ = _lora_forward(dplan, xs[0], None, dseed, ddrop, A[0])
                torch.cuda.synchronize()
                err = (got - ref_h).abs().max().item() / max(ref_h.abs().max().item(), 1e-6)
                t = triton.testing.do_bench_cudagraph(
                    lambda: [_lora_forward(dplan, x, None, dseed, ddrop, A[0]) for x in xs], rep=100) / copies * 1e3
                print(f"[{K}->{N}] production {'dropout 0.1' if p else 'no dropout'} {dict(cfg.kwargs)} "
                      f"w{cfg.num_warps} s{cfg.num_stages}: {t:.1f} us ({gb / t * 1e3:.2f} TB/s), rel diff from "
                      f"the table config {dict(table_cfg.kwargs) if table_cfg else None} {err:.1e}", flush=True)
            if table_cfg is not None:
                _SHRINK.best[key] = table_cfg


if __name__ == "__main__":
    main()
