"""Backward, the X pass: ``dX = c_i (G A_i) ⊙ mask`` and ``dA_i = c_i Gᵀ (mask ⊙ X)``.

Both need the same chunk of rows and the same ``BLOCK_K`` slice of the input features, so one
program reads ``A_i``'s tile once, X once and writes dX once (the dropout mask is regenerated
from Philox exactly as ``lora_shrink`` drew it). ``dA`` is accumulated in registers over the
chunk and added atomically once into the fp32 packed ``dA [Σr, in]``. With ``ADD_DX`` the kernel
adds its dX into the one already in ``dx`` (the frozen base's ``dY W``), in fp32 before the one
rounding: autograd's separate add of the two (a read of both and a write) is saved.

With ``SPLIT_ROLES`` the two products go to different programs (the launch grid's third axis):
the dX programs read G and A_i and write dX, the dA programs read G and X. The bytes moved are the
same, but each program holds one product's registers instead of both: the fused loop is limited
to a quarter of the warps an SM can hold by its registers (116 a thread at 8 x 512, rank 16 on
the H100: Nsight Compute, BENCHMARKS.md), and the kernel waits on global loads for about half of
its cycles, so more warps in flight might hide more of that. On an H100 they did not: split, the
configs need 95-200 registers against 164-255 (Triton 3.6, ``benchmarks/kernel_regs.py``), yet
autotuning chose none, and a layer's fwd+bwd was no faster with them. At K = 14336 the fused pass
already moves X and dX at 2.56 TB/s, so it is bound by bandwidth more than by latency. They stay
candidates (``_common.CANDIDATE_CONFIGS``).
"""
import triton
import triton.language as tl

from ._common import (CANDIDATE_CONFIGS, CONFIG_DEFAULTS, cfg, chunk_meta, configs, dropout_key, dropout_pos,
                      grad_sink_ptrs, mma, quick_bench, seq_stride, weight_ptrs)

# Table rows made before the switch run both products in every program.
CONFIG_DEFAULTS["lora_bwd_dx"] = {"SPLIT_ROLES": False}
SPLIT_ROLES_CONFIGS = [cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_ROLES=True, num_warps=w, num_stages=s)
                       for (bm, bk, w, s) in [(64, 128, 4, 3), (32, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3),
                                              (32, 256, 4, 3), (64, 64, 4, 4)]]
BWD_DX_CONFIGS = configs(
    full=[cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_ROLES=False, num_warps=w, num_stages=s)
          for (bm, bk, w, s) in [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (32, 256, 4, 3),
                                 (128, 128, 8, 3), (64, 64, 4, 4)]]
    + (SPLIT_ROLES_CONFIGS if CANDIDATE_CONFIGS else []),
    interp=cfg(BLOCK_M=16, BLOCK_K=32, SPLIT_ROLES=False, num_warps=4, num_stages=1))


@triton.jit
def _rows_pass(x_ptr, g_ptr, dx_ptr, a, lo, hi, seg0, p, c, key, stride, cols, col_ok, rr, K, stride_xm, stride_dxm,
               width, R: tl.constexpr, HAS_DROPOUT: tl.constexpr, DO_DX: tl.constexpr, DO_DA: tl.constexpr,
               DOT_PREC: tl.constexpr, ADD_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The chunk's rows, one ``BLOCK_M`` block at a time: dX stored (``DO_DX``), dA's sum returned
    (``DO_DA``; zeros otherwise)."""
    da = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0).to(a.dtype)
        if DO_DX:
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
        if DO_DA:
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
            if HAS_DROPOUT:
                keep_x = tl.rand(key, dropout_pos(rows - seg0, width, stride)[:, None] * K + cols[None, :]) >= p
                x = tl.where(keep_x, x, 0.0)
            da = mma(tl.trans(g), x, da, DOT_PREC)
    return da


@triton.jit
def _store_da(da_ptr, ptrs_ptr, da, adapter, roff, rank, c, cols, col_ok, rr, K, ALIGN: tl.constexpr,
              GRAD_SINK: tl.constexpr):
    r_ok = rr < rank
    if GRAD_SINK:                            # adapter i's own fp32 dA buffer [r_i, in]
        da_blk, gb_ptr = grad_sink_ptrs(ptrs_ptr, adapter, ALIGN)
        da_out = da_blk + rr.to(tl.int64)[:, None] * K + cols[None, :]
    else:                                    # rows roff.. of the packed workspace dA [Σr, in]
        da_out = da_ptr + (roff + rr).to(tl.int64)[:, None] * K + cols[None, :]
    tl.atomic_add(da_out, da * c, mask=r_ok[:, None] & col_ok[None, :], sem="relaxed")


@triton.autotune(configs=BWD_DX_CONFIGS, key=["K", "R", "T_HINT"], reset_to_zero=["da_ptr"],
                  do_bench=quick_bench)
@triton.jit(do_not_specialize=["seed", "width"])
def lora_bwd_dx_kernel(x_ptr, g_ptr, dx_ptr, da_ptr, meta_ptr, ptrs_ptr, w_ref, K, stride_xm, stride_dxm,
                       T_HINT, seed, streams_ptr, width, R: tl.constexpr, ALIGN: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr,
                       DOT_PREC: tl.constexpr, GRAD_SINK: tl.constexpr, ADD_DX: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_ROLES: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)
    key = dropout_key(seed, streams_ptr, ptrs_ptr, adapter)
    stride = seq_stride(meta_ptr, pid)

    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, R)
    a = tl.load(a_ptr + rr[:, None] * K + cols[None, :],
                mask=(rr < rank)[:, None] & col_ok[None, :], other=0.0)  # [R, BLOCK_K]
    a = a.to(x_ptr.dtype.element_ty)
    if SPLIT_ROLES and COMPUTE_DX and COMPUTE_DA:
        # Launch-grid axis 2 picks one product per program: twice the programs, each with the
        # registers of one product live (the fused loop holds both and is register-limited).
        if tl.program_id(2) == 0:
            _rows_pass(x_ptr, g_ptr, dx_ptr, a, lo, hi, seg0, p, c, key, stride, cols, col_ok, rr, K, stride_xm,
                       stride_dxm, width, R, HAS_DROPOUT, True, False, DOT_PREC, ADD_DX, BLOCK_M, BLOCK_K)
        else:
            da = _rows_pass(x_ptr, g_ptr, dx_ptr, a, lo, hi, seg0, p, c, key, stride, cols, col_ok, rr, K,
                            stride_xm, stride_dxm, width, R, HAS_DROPOUT, False, True, DOT_PREC, ADD_DX, BLOCK_M,
                            BLOCK_K)
            _store_da(da_ptr, ptrs_ptr, da, adapter, roff, rank, c, cols, col_ok, rr, K, ALIGN, GRAD_SINK)
    else:
        da = _rows_pass(x_ptr, g_ptr, dx_ptr, a, lo, hi, seg0, p, c, key, stride, cols, col_ok, rr, K, stride_xm,
                        stride_dxm, width, R, HAS_DROPOUT, COMPUTE_DX, COMPUTE_DA, DOT_PREC, ADD_DX, BLOCK_M, BLOCK_K)
        if COMPUTE_DA:
            _store_da(da_ptr, ptrs_ptr, da, adapter, roff, rank, c, cols, col_ok, rr, K, ALIGN, GRAD_SINK)
