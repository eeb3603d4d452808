"""The frozen base GEMM with the LoRA expand in its epilogue, for Y (forward) or dX (backward).

    forward  (``W_NK``):  Y  = X Wᵀ + H_s B_aᵀ         H_s from ``lora_shrink`` (already scaled)
    backward:             dX = dY W + c_a · G A_a       G from ``lora_bwd_dy``; no dropout

where ``a`` is the adapter of each row. The stand-alone ``lora_expand`` / ``lora_bwd_dx`` write a
[T, out] (or [T, in]) delta that the base GEMM then reads back: at 8 x 512 tokens that round
trip is ~20 us of HBM traffic per layer and direction, as much as a tenth of the GEMM. Here the
skinny product is one more ``tl.dot`` on the accumulator before the single store.

A persistent kernel (one program per SM walking output tiles in grouped order) that reads X/dY
and W through TMA descriptors (Hopper) or the interpreter's emulation of them. A row tile may
hold rows of several adapters: the epilogue walks the chunks (``plan.table``, runs of one
adapter's rows) that overlap the tile, masking the rows that are not the chunk's. Chunks of a
tile are consecutive, so a per-row chunk index (``row_chunks``) gives the first and the last.
"""
import triton
import triton.language as tl

from ._common import cfg, chunk_meta, configs, mma, quick_bench, weight_ptrs


def _block_shapes(nargs) -> None:
    """The descriptors' block shapes follow the config being launched (autotune pre-hook)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_NK"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _gcfg(bm, bn, bk, w, s, g=8):
    c = cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)
    c.pre_hook = _block_shapes
    return c


GEMM_CONFIGS = configs(
    full=[_gcfg(bm, bn, bk, w, s) for (bm, bn, bk, w, s) in
          [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
           (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (256, 128, 64, 8, 3)]],
    interp=_gcfg(16, 32, 32, 4, 1, g=2))


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "R", "W_NK"], do_bench=quick_bench)
@triton.jit
def lora_gemm_kernel(a_desc, w_desc, c_desc, l_ptr, row_chunks_ptr, meta_ptr, ptrs_ptr, w_ref, M, N, K,
                     R: tl.constexpr, W_NK: tl.constexpr, NUM_SMS: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    in_group = GROUP_M * num_n
    rr = tl.arange(0, R)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
        first_m = (tile // in_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        m0 = (first_m + tile % group_m) * BLOCK_M
        n0 = ((tile % in_group) // group_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([m0, ki * BLOCK_K])
            if W_NK:
                acc = mma(a, w_desc.load([n0, ki * BLOCK_K]).T, acc, DOT_PREC)
            else:
                acc = mma(a, w_desc.load([ki * BLOCK_K, n0]), acc, DOT_PREC)

        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        skinny = tl.load(l_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0)
        c_first = tl.load(row_chunks_ptr + m0)
        c_last = tl.load(row_chunks_ptr + tl.minimum(m0 + BLOCK_M, M) - 1)
        for ch in range(c_first, c_last + 1):
            lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, ch)
            a_w, b_w = weight_ptrs(ptrs_ptr, adapter, w_ref)
            ok = (rr < rank)[:, None] & col_ok[None, :]
            if W_NK:   # B_aᵀ tile [R, BLOCK_N]; B_a is [out, rank]; H_s carries c already
                lw = tl.load(b_w + cols[None, :] * rank + rr[:, None], mask=ok, other=0.0)
                scale = 1.0
            else:      # A_a tile [R, BLOCK_N]; A_a is [rank, in]
                lw = tl.load(a_w + rr[:, None] * N + cols[None, :], mask=ok, other=0.0)
                scale = c
            mine = tl.where(((rows >= lo) & (rows < hi))[:, None], skinny, 0.0)
            lw = lw.to(c_desc.dtype)
            acc += mma(mine.to(lw.dtype), lw, None, DOT_PREC) * scale
        c_desc.store([m0, n0], acc.to(c_desc.dtype))
