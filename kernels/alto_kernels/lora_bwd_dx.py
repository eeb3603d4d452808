"""Backward, the X pass: ``dX = c_i (G A_i) ⊙ mask`` and ``dA_i = c_i Gᵀ (mask ⊙ X)``.

Both need the same chunk of rows and the same ``BLOCK_K`` slice of the input features, so one
program reads ``A_i``'s tile once, X once and writes dX once (the dropout mask is regenerated
from Philox exactly as ``lora_shrink`` drew it). ``dA`` is accumulated in registers over the
chunk and added atomically once into the fp32 packed ``dA [Σr, in]``. With ``ADD_DX`` the kernel
adds its dX into the one already in ``dx`` (the frozen base's ``dY W``), in fp32 before the one
rounding: autograd's separate add of the two (a read of both and a write) is saved.
"""
import triton
import triton.language as tl

from ._common import (cfg, chunk_meta, configs, dropout_key, dropout_pos, grad_sink_ptrs, mma, quick_bench,
                      seq_stride, weight_ptrs)

BWD_DX_CONFIGS = configs(
    full=[cfg(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
          for (bm, bk, w, s) in [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (32, 256, 4, 3),
                                 (128, 128, 8, 3), (64, 64, 4, 4)]],
    interp=cfg(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1))


@triton.autotune(configs=BWD_DX_CONFIGS, key=["K", "R", "T_HINT"], reset_to_zero=["da_ptr"],
                  do_bench=quick_bench)
@triton.jit(do_not_specialize=["seed", "width"])
def lora_bwd_dx_kernel(x_ptr, g_ptr, dx_ptr, da_ptr, meta_ptr, ptrs_ptr, w_ref, K, stride_xm, stride_dxm,
                       T_HINT, seed, streams_ptr, width, R: tl.constexpr, ALIGN: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr,
                       DOT_PREC: tl.constexpr, GRAD_SINK: tl.constexpr, ADD_DX: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)
    key = dropout_key(seed, streams_ptr, ptrs_ptr, adapter)
    stride = seq_stride(meta_ptr, pid)

    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, R)
    r_ok = rr < rank
    a_rows = (roff + rr).to(tl.int64)
    a = tl.load(a_ptr + rr[:, None] * K + cols[None, :],
                mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [R, BLOCK_K]
    a = a.to(x_ptr.dtype.element_ty)
    da = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0).to(a.dtype)
        if COMPUTE_DX:
            dx = mma(g, a, None, DOT_PREC) * c
            if HAS_DROPOUT:
                # Same offsets as below, written differently: one `keep` shared by the dx store
                # and the dA dot operand makes Triton 3.6's LLVM lowering assert (R = 16).
                local = rows - seg0
                pos = (local // width) * stride
                keep = tl.rand(key, pos[:, None] * K + (local % width)[:, None] * K + cols[None, :]) >= p
                dx = tl.where(keep, dx, 0.0)
            if ADD_DX:  # dx holds the base linear's input gradient: add to it, not beside it
                dx += tl.load(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if COMPUTE_DA:
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
            if HAS_DROPOUT:
                keep_x = tl.rand(key, dropout_pos(rows - seg0, width, stride)[:, None] * K + cols[None, :]) >= p
                x = tl.where(keep_x, x, 0.0)
            da = mma(tl.trans(g), x, da, DOT_PREC)
    if COMPUTE_DA:
        if GRAD_SINK:                            # adapter i's own fp32 dA buffer [r_i, in]
            da_blk, gb_ptr = grad_sink_ptrs(ptrs_ptr, adapter, ALIGN)
            da_out = da_blk + rr.to(tl.int64)[:, None] * K + cols[None, :]
        else:                                    # rows roff.. of the packed workspace dA [Σr, in]
            da_out = da_ptr + a_rows[:, None] * K + cols[None, :]
        tl.atomic_add(da_out, da * c, mask=r_ok[:, None] & col_ok[None, :], sem="relaxed")
