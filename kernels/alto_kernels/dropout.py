"""The kernels' dropout mask, materialised: for tests and debugging only.

``lora_shrink`` and ``lora_bwd_dx`` never store a mask; they draw ``keep = tl.rand(key_i,
pos * in + col) >= p_i`` from Philox (key and dropout position: ``_common``). This kernel evaluates the same expression over the
same chunk table, so ``dropout_mask(...)`` can be fed to ``multi_lora_reference(dropout_masks=...)``
and compared bit for bit.
"""
import triton
import triton.language as tl

from ._common import cfg, chunk_meta, configs, dropout_key, dropout_pos, seq_stride

MASK_CONFIGS = configs(full=[cfg(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=2)],
                       interp=cfg(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1))


@triton.autotune(configs=MASK_CONFIGS, key=["K"])
@triton.jit(do_not_specialize=["seed", "width"])
def dropout_mask_kernel(mask_ptr, meta_ptr, ptrs_ptr, K, seed, streams_ptr, width,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, 1)
    key = dropout_key(seed, streams_ptr, ptrs_ptr, adapter)
    stride = seq_stride(meta_ptr, pid)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        keep = tl.rand(key, dropout_pos(rows - seg0, width, stride)[:, None] * K + cols[None, :]) >= p
        tl.store(mask_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8),
                 mask=(rows < hi)[:, None] & (cols < K)[None, :])
