"""The frozen base GEMM with the LoRA expand in its epilogue, for Y (forward) or dX (backward).

    forward  (``W_NK``):  Y  = X Wᵀ + H_s B_aᵀ         H_s from ``lora_shrink`` (already scaled)
    backward:             dX = dY W + c_a · G A_a       G from ``lora_bwd_dy``; no dropout

where ``a`` is the adapter of each row. The stand-alone ``lora_expand`` / ``lora_bwd_dx`` write a
[T, out] (or [T, in]) delta that the base GEMM then reads back: at 8 x 512 tokens that round
trip is ~20 us of HBM traffic per layer and direction, as much as a tenth of the GEMM. Here the
skinny product is one more ``tl.dot`` on the accumulator before the single store.

A persistent kernel (one program per SM walking output tiles in grouped order) that reads X/dY
and W through TMA descriptors (Hopper) or the interpreter's emulation of them. A row tile may
hold rows of several adapters: the epilogue walks the segments that overlap the tile (per-row
segment index ``row_segs``; segments are consecutive), masking the rows that are not the
segment's. With ``SEGS > 0`` (the most segments any 256-row window holds, a power of two) that
walk is a static loop of ``SEGS`` guarded steps, which keeps every inner loop's bounds
invariant so that ``FLATTEN`` can fuse the tile loop with the K loop: the software pipeliner
then loads the next tile's first K blocks while this tile's epilogue runs. ``SEGS = 0`` is the
dynamic walk for batches of many short segments.
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


def _gcfg(bm, bn, bk, w, s, g=8, flatten=False):
    c = cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, FLATTEN=flatten, num_warps=w, num_stages=s)
    c.pre_hook = _block_shapes
    return c


# The persistent-matmul tutorial's Hopper shapes; the flattened ones only apply where SEGS > 0.
GEMM_CONFIGS = configs(
    full=[_gcfg(bm, bn, bk, w, s) for (bm, bn, bk, w, s) in
          [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
           (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (256, 128, 64, 8, 3)]]
    + [_gcfg(bm, bn, bk, w, s, flatten=True) for (bm, bn, bk, w, s) in
       [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
        (128, 128, 128, 8, 3)]],
    interp=_gcfg(16, 32, 32, 4, 1, g=2, flatten=True))


# False drops the flattened configs everywhere (benchmarks/lora_gemm.py --flatten off: the A/B).
FLATTEN_OK = True


def _prune(configs, named_args, **kwargs):
    """Flattening needs the static segment walk; drop those configs for the dynamic one."""
    if FLATTEN_OK and {**named_args, **kwargs}["SEGS"] > 0:
        return configs
    return [c for c in configs if not c.kwargs["FLATTEN"]] or configs


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "R", "W_NK", "SEGS"], do_bench=quick_bench,
                  prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lora_gemm_kernel(a_desc, w_desc, c_desc, l_ptr, row_segs_ptr, segs_ptr, meta_ptr, ptrs_ptr, w_ref, M, N, K,
                     R: tl.constexpr, W_NK: tl.constexpr, SEGS: tl.constexpr, NUM_SMS: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    in_group = GROUP_M * num_n
    tile_c = tl.program_id(0) - NUM_SMS  # the epilogue's own tile counter (the tutorial's tile_id_c)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        m0, n0 = _tile(tile, in_group, num_m, GROUP_M, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([m0, ki * BLOCK_K])
            if W_NK:
                acc = mma(a, w_desc.load([n0, ki * BLOCK_K]).T, acc, DOT_PREC)
            else:
                acc = mma(a, w_desc.load([ki * BLOCK_K, n0]), acc, DOT_PREC)

        tile_c += NUM_SMS
        m0, n0 = _tile(tile_c, in_group, num_m, GROUP_M, BLOCK_M, BLOCK_N)
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        skinny = tl.load(l_ptr + rows.to(tl.int64)[:, None] * R + tl.arange(0, R)[None, :],
                         mask=(rows < M)[:, None], other=0.0)
        s_first = tl.load(row_segs_ptr + m0)
        s_last = tl.load(row_segs_ptr + tl.minimum(m0 + BLOCK_M, M) - 1)
        if SEGS > 0:
            for j in tl.static_range(SEGS):
                if s_first + j <= s_last:
                    acc = _add_segment(acc, s_first + j, rows, cols, skinny, segs_ptr, meta_ptr, ptrs_ptr, w_ref,
                                       N, R, W_NK, DOT_PREC, c_desc.dtype)
        else:
            for s in range(s_first, s_last + 1):
                acc = _add_segment(acc, s, rows, cols, skinny, segs_ptr, meta_ptr, ptrs_ptr, w_ref,
                                   N, R, W_NK, DOT_PREC, c_desc.dtype)
        c_desc.store([m0, n0], acc.to(c_desc.dtype))


@triton.jit
def _tile(tile, in_group, num_m, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First row and column of output tile ``tile`` in grouped order (GROUP_M row tiles share W)."""
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return (first_m + tile % group_m) * BLOCK_M, ((tile % in_group) // group_m) * BLOCK_N


@triton.jit
def _add_segment(acc, s, rows, cols, skinny, segs_ptr, meta_ptr, ptrs_ptr, w_ref, N, R: tl.constexpr,
                 W_NK: tl.constexpr, DOT_PREC: tl.constexpr, out_dtype: tl.constexpr):
    """``acc`` plus segment ``s``'s rows of ``skinny`` times its adapter's B_aᵀ (or c_a A_a)."""
    lo = tl.load(segs_ptr + 3 * s)
    hi = tl.load(segs_ptr + 3 * s + 1)
    _, _, rank, _, _, adapter, _, c = chunk_meta(meta_ptr, tl.load(segs_ptr + 3 * s + 2), 1)
    a_w, b_w = weight_ptrs(ptrs_ptr, adapter, w_ref, 1)
    rr = tl.arange(0, R)
    ok = (rr < rank)[:, None] & (cols < N)[None, :]
    if W_NK:   # B_aᵀ tile [R, BLOCK_N]; B_a is [out, rank]; H_s carries c already
        lw = tl.load(b_w + cols[None, :] * rank + rr[:, None], mask=ok, other=0.0)
        scale = 1.0
    else:      # A_a tile [R, BLOCK_N]; A_a is [rank, in]
        lw = tl.load(a_w + rr[:, None] * N + cols[None, :], mask=ok, other=0.0)
        scale = c
    mine = tl.where(((rows >= lo) & (rows < hi))[:, None], skinny, 0.0)
    lw = lw.to(out_dtype)
    return acc + mma(mine.to(lw.dtype), lw, None, DOT_PREC) * scale
