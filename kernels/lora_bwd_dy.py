"""Backward, the dY pass: ``G = dY B_i`` and ``dB_i = dYᵀ H_s`` from ONE read of dY.

dY [T, out] is the largest tensor the LoRA backward touches besides X and dX, so both
products that need it share each tile: a program owns one chunk of one adapter's tokens and
one ``BLOCK_N`` slice of the output features, and for every row block of the chunk loads
``dY`` once, feeds ``dB`` (accumulated in registers over the chunk, added atomically once at
the end) and ``G`` (reduced over the output slices with fp32 atomics into ``G [T, R]``).
The LoRA scale already sits in ``H_s`` (so ``dB = dYᵀ H_s``) and is applied to ``G`` in
``lora_bwd_dx``.
"""
import triton
import triton.language as tl

from ._common import cfg, chunk_meta, configs, mma

BWD_DY_CONFIGS = configs(
    full=[cfg(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
          for (bm, bn, w, s) in [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (32, 256, 4, 3),
                                 (128, 128, 8, 3), (64, 64, 4, 4)]],
    interp=cfg(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1))


@triton.autotune(configs=BWD_DY_CONFIGS, key=["N", "R", "T_HINT"], reset_to_zero=["g_ptr", "db_ptr"])
@triton.jit
def lora_bwd_dy_kernel(dy_ptr, h_ptr, bt_ptr, g_ptr, db_ptr, meta_ptr, N, stride_dym, stride_bt, T_HINT,
                       R: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    lo, hi, rank, roff, seg0, seed, p, c = chunk_meta(meta_ptr, pid)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, R)
    r_ok = rr < rank
    b_rows = (roff + rr).to(tl.int64)
    b = tl.load(bt_ptr + b_rows[None, :] * stride_bt + cols[:, None],
                mask=r_ok[None, :] & col_ok[:, None], other=0.0)  # [BLOCK_N, R] = B_i tile
    db = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        h = tl.load(h_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0)
        db = mma(tl.trans(dy), h.to(dy.dtype), db, DOT_PREC)
        g = mma(dy, b.to(dy.dtype), None, DOT_PREC)
        tl.atomic_add(g_ptr + rows64[:, None] * R + rr[None, :], g,
                      mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")
    tl.atomic_add(db_ptr + b_rows[None, :] * N + cols[:, None], db,
                  mask=r_ok[None, :] & col_ok[:, None], sem="relaxed")
