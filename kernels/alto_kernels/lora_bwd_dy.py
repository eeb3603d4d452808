"""Backward, the dY pass: ``G = dY B_i`` and ``dB_i = dYᵀ H_s`` from ONE read of dY.

dY [T, out] is, with X and dX, one of the big tensors of the LoRA backward, so both products
that need it share each tile. A program owns one whole chunk of one adapter's tokens as its row
block (``BLOCK_M`` = the host's chunk size) and a ``1/SPLIT_N`` slice of the output features,
which it streams in ``BLOCK_N`` tiles: ``G``'s rows are reduced over the slice in registers
(one store, or one atomic add per split), ``H_s``'s rows are loaded once, and each tile's
``dB`` partial ``[BLOCK_N, r_i]`` is added atomically into the fp32 workspace, where adapter
``i``'s ``dB_i`` is a contiguous ``[out, r_i]`` block at ``roff_i · out`` (returned as a view,
no copy). The LoRA scale already sits in ``H_s``; ``lora_bwd_dx`` applies it to ``G``.

``PREFETCH_B``: B_i's tiles are loaded one iteration ahead by hand (added when Triton could not
know the table's addresses were aligned and left their loads synchronous); without it they are
left to the compiler's pipeline, as the shrink's A_i tiles were faster left (BENCHMARKS.md,
Kernels). The configs without it were up to 6% faster in this kernel on an H100 and no faster in
a layer's fwd+bwd: they stay candidates (``_common.CANDIDATE_CONFIGS``).
"""
import triton
import triton.language as tl

from ._common import CANDIDATE_CONFIGS, CONFIG_DEFAULTS, cfg, chunk_meta, configs, grad_sink_ptrs, mma, quick_bench, \
    weight_ptrs

# Table rows made before the switch load B_i's tiles by hand one ahead.
CONFIG_DEFAULTS["lora_bwd_dy"] = {"PREFETCH_B": True}
PIPELINED_B_CONFIGS = [cfg(BLOCK_N=bn, SPLIT_N=sn, PREFETCH_B=False, num_warps=w, num_stages=s)
                       for (bn, sn, w, s) in [(128, 8, 8, 3), (128, 4, 8, 4), (64, 8, 4, 4), (64, 4, 4, 3)]]
BWD_DY_CONFIGS = configs(
    full=[cfg(BLOCK_N=bn, SPLIT_N=sn, PREFETCH_B=True, num_warps=w, num_stages=s)
          for (bn, sn, w, s) in [(64, 4, 4, 3), (64, 8, 4, 4), (128, 4, 8, 3), (128, 8, 8, 3),
                                 (64, 16, 4, 3), (128, 2, 8, 3), (32, 8, 4, 4), (64, 2, 4, 4)]]
    + (PIPELINED_B_CONFIGS if CANDIDATE_CONFIGS else []),
    interp=cfg(BLOCK_N=16, SPLIT_N=2, PREFETCH_B=True, num_warps=4, num_stages=1))


@triton.autotune(configs=BWD_DY_CONFIGS, key=["N", "R", "T_HINT", "BLOCK_M"], reset_to_zero=["g_ptr", "db_ptr"],
                  do_bench=quick_bench)
@triton.jit
def lora_bwd_dy_kernel(dy_ptr, h_ptr, g_ptr, db_ptr, meta_ptr, ptrs_ptr, w_ref, N, stride_dym, T_HINT,
                       R: tl.constexpr, ALIGN: tl.constexpr, DOT_PREC: tl.constexpr, GRAD_SINK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
                       PREFETCH_B: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)

    rows = lo + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, R)
    r_ok = rr < rank
    h = tl.load(h_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None], other=0.0)
    h = h.to(dy_ptr.dtype.element_ty)
    if GRAD_SINK:                                # adapter i's own fp32 dB buffer [out, r_i]
        ga_ptr, db_blk = grad_sink_ptrs(ptrs_ptr, adapter, ALIGN)
    else:                                        # adapter i's [out, r_i] block of the workspace
        db_blk = db_ptr + roff.to(tl.int64) * N
    n_per = tl.cdiv(tl.cdiv(N, SPLIT_N), BLOCK_N) * BLOCK_N
    n_lo = pid_n * n_per
    n_hi = tl.minimum(N, n_lo + n_per)
    g = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    nn = tl.arange(0, BLOCK_N)
    if PREFETCH_B:  # B_i's tiles loaded one iteration ahead by hand (see the module docstring)
        b_next = tl.load(b_ptr + (n_lo + nn)[:, None] * rank + rr[None, :],
                         mask=((n_lo + nn) < n_hi)[:, None] & r_ok[None, :], other=0.0)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + nn
        col_ok = cols < n_hi
        if PREFETCH_B:
            b = b_next  # [BLOCK_N, R] = B_i tile
            nxt = cols + BLOCK_N
            b_next = tl.load(b_ptr + nxt[:, None] * rank + rr[None, :],
                             mask=(nxt < n_hi)[:, None] & r_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptr + cols[:, None] * rank + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        g = mma(dy, b.to(dy.dtype), g, DOT_PREC)
        db = mma(tl.trans(dy), h, None, DOT_PREC)
        tl.atomic_add(db_blk + cols[:, None] * rank + rr[None, :], db,
                      mask=col_ok[:, None] & r_ok[None, :], sem="relaxed")
    g_ptrs = g_ptr + rows64[:, None] * R + rr[None, :]
    if SPLIT_N == 1:
        tl.store(g_ptrs, g, mask=row_ok[:, None])
    else:
        tl.atomic_add(g_ptrs, g, mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")
