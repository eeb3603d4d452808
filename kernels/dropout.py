"""The kernels' dropout mask, materialised: for tests and debugging only.

``lora_shrink`` and ``lora_bwd_dx`` never store a mask; they draw ``keep = tl.rand(key_i,
local_row * in + col) >= p_i`` from Philox. This kernel evaluates the same expression over the
same chunk table, so ``dropout_mask(...)`` can be fed to ``multi_lora_reference(dropout_masks=...)``
and compared bit for bit.
"""
import triton
import triton.language as tl

from ._common import cfg, chunk_meta, configs, philox_key

MASK_CONFIGS = configs(full=[cfg(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=2)],
                       interp=cfg(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1))


@triton.autotune(configs=MASK_CONFIGS, key=["K"])
@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(mask_ptr, meta_ptr, K, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid)
    key = philox_key(seed, adapter)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        keep = tl.rand(key, (rows - seg0)[:, None] * K + cols[None, :]) >= p
        tl.store(mask_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8),
                 mask=(rows < hi)[:, None] & (cols < K)[None, :])
