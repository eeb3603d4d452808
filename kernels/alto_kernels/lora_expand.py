"""Forward expand: ``Y[t, :] += H_s[t, :r_i] B_iᵀ`` in place (the base output is the accumulator).

Fusing the add into the second LoRA GEMM means Y is read once and written once and no
[T, out] delta is ever materialised. Without ``ACCUMULATE`` it stores the delta instead (Y is
only written): the one-node linear then adds the base GEMM into it with ``addmm_``, whose
compute-bound epilogue reads it nearly for free. Each program owns one chunk of one adapter's tokens and
one ``BLOCK_N`` slice of the output features; B_iᵀ's tile is loaded once and reused over the
chunk's row blocks (B_i is read in place, [out, r_i], through its address in the chunk table).

With ``ZERO_G`` the chunk's first column block also zero-fills the chunk's rows of the backward's
``G [T, R]`` (fp32, which ``lora_bwd_dy`` accumulates into): a few stores here instead of a
launch of its own in the backward.
"""
import triton
import triton.language as tl

from ._common import cfg, chunk_meta, configs, mma, quick_bench, weight_ptrs

EXPAND_CONFIGS = configs(
    full=[cfg(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
          for (bm, bn, w, s) in [(32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3), (64, 256, 8, 3),
                                 (128, 128, 8, 3), (16, 256, 4, 4), (64, 64, 4, 4)]],
    interp=cfg(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1))


@triton.autotune(configs=EXPAND_CONFIGS, key=["N", "R", "T_HINT"], restore_value=["y_ptr"],
                  do_bench=quick_bench)
@triton.jit
def lora_expand_kernel(h_ptr, y_ptr, g_ptr, meta_ptr, ptrs_ptr, w_ref, N, stride_ym, T_HINT,
                       R: tl.constexpr, ALIGN: tl.constexpr, DOT_PREC: tl.constexpr, ACCUMULATE: tl.constexpr,
                       ZERO_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, R)
    b = tl.load(b_ptr + cols[None, :] * rank + rr[:, None],
                mask=(rr < rank)[:, None] & col_ok[None, :], other=0.0)  # [R, BLOCK_N] = B_iᵀ tile
    b = b.to(y_ptr.dtype.element_ty)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        h = tl.load(h_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0)
        y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if ACCUMULATE:
            y = mma(h.to(b.dtype), b, tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32), DOT_PREC)
        else:
            y = mma(h.to(b.dtype), b, None, DOT_PREC)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)
        if ZERO_G:
            if pid_n == 0:
                tl.store(g_ptr + rows64[:, None] * R + rr[None, :], tl.zeros((BLOCK_M, R), dtype=tl.float32),
                         mask=row_ok[:, None])
