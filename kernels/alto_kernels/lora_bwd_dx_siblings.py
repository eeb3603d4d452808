"""Backward, the X pass of sibling linears: ``dX = Σ_j c (G_j A_ji) ⊙ mask_j`` and each ``dA_ji``.

Sibling linears (q/k/v, gate/up) read the same X. Run one ``lora_bwd_dx`` each, they read X and
write (then re-read, to add into) dX once per sibling. This pass does all of a layer's siblings in
one launch: a program owns one chunk of one adapter's rows and one ``BLOCK_K`` slice of the
features, as in ``lora_bwd_dx``; it first sums every sibling's ``G_j A_ji`` into its dX tile (one
store), then accumulates each sibling's ``dA_ji`` over the chunk in turn. The chunk's X slice
comes from HBM for the first sibling and from L2 for the next ones.

The siblings share the chunk table (the same adapters on the same rows, so the same ranks,
scales and dropout rates); each has its own pointer table (A, the dA sink, the dropout stream),
its slice of ``G`` (``[NSIB, T, R]``) and its dropout seed (masks differ per sibling, as with one
node each). Up to three siblings; the gradient sink only (the engine's path).
"""
import triton
import triton.language as tl

from ._common import chunk_meta, dropout_key, dropout_pos, mma, seq_stride, weight_ptrs
from .lora_bwd_dx import _store_da


@triton.jit
def _seed_of(j: tl.constexpr, seed0, seed1, seed2):
    if j == 0:
        s = seed0
    elif j == 1:
        s = seed1
    else:
        s = seed2
    return s


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2", "width"])
def lora_bwd_dx_siblings_kernel(x_ptr, g_ptr, dx_ptr, meta_ptr, ptrs_ptr, w_ref, K, stride_xm, stride_dxm, g_sib,
                                ptrs_sib, seed0, seed1, seed2, streams_ptr, width, R: tl.constexpr, ALIGN: tl.constexpr,
                                HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, DOT_PREC: tl.constexpr,
                                NSIB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    stride = seq_stride(meta_ptr, pid)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, R)
    a_ok = (rr < rank)[:, None] & col_ok[None, :]
    if COMPUTE_DX:
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < hi
            rows64 = rows.to(tl.int64)
            dx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j in tl.static_range(NSIB):
                ptrs_j = ptrs_ptr + j * ptrs_sib
                a_ptr, b_ptr = weight_ptrs(ptrs_j, adapter, w_ref, ALIGN)
                a = tl.load(a_ptr + rr[:, None] * K + cols[None, :], mask=a_ok, other=0.0).to(x_ptr.dtype.element_ty)
                g = tl.load(g_ptr + j * g_sib + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None],
                            other=0.0).to(a.dtype)
                t = mma(g, a, None, DOT_PREC)
                if HAS_DROPOUT:
                    key = dropout_key(_seed_of(j, seed0, seed1, seed2), streams_ptr, ptrs_j, adapter)
                    local = rows - seg0
                    pos = (local // width) * stride
                    keep = tl.rand(key, pos[:, None] * K + (local % width)[:, None] * K + cols[None, :]) >= p
                    t = tl.where(keep, t, 0.0)
                dx += t
            tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :], (dx * c).to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
    for j in tl.static_range(NSIB):
        ptrs_j = ptrs_ptr + j * ptrs_sib
        key = dropout_key(_seed_of(j, seed0, seed1, seed2), streams_ptr, ptrs_j, adapter)
        da = tl.zeros((R, BLOCK_K), dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < hi
            rows64 = rows.to(tl.int64)
            g = tl.load(g_ptr + j * g_sib + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None],
                        other=0.0).to(x_ptr.dtype.element_ty)
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if HAS_DROPOUT:
                keep_x = tl.rand(key, dropout_pos(rows - seg0, width, stride)[:, None] * K + cols[None, :]) >= p
                x = tl.where(keep_x, x, 0.0)
            da = mma(tl.trans(g), x, da, DOT_PREC)
        _store_da(ptrs_j, ptrs_j, da, adapter, roff, rank, c, cols, col_ok, rr, K, ALIGN, True)
