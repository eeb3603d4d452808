"""Forward shrink: ``H_s[t, :r_i] = c_i · (mask ⊙ X[t]) A_iᵀ`` with ``c_i = scale_i / (1 - p_i)``.

The first LoRA GEMM is skinny (N = rank ≤ 128) and reads all of X, so it is memory-bound:
each program owns one chunk of one adapter's tokens and one slice of the input features
(split-K, partial sums added atomically into the fp32 ``H_s``), streaming X exactly once.
Dropout is drawn in-kernel with Philox (``tl.rand(key_i, pos*K + col)``, ``key_i`` from the
launch ``seed`` and the adapter's entry of the stream table, ``pos`` its dropout position:
``_common``), so no
[T, in] mask is ever stored; ``lora_bwd_dx`` and ``dropout_mask`` regenerate the same bits.
Ranks differ per adapter: the rank axis is padded to the power of two ``R`` and loads of A_i
(read in place through its address in the chunk table) beyond ``r_i`` are masked to zero, so
``H_s[:, r_i:]`` is zero.

With ``TICKETS`` every row of ``H_s`` is stored, never accumulated into, so it needs no
zero-fill (a launch of its own, as many as the LoRA kernels themselves on the host-bound path).
With ``SPLIT_K`` > 1 the programs of one chunk then reduce serially: split 0 stores its partial
sums into ``H_s``, split k into slice k-1 of ``part`` (``[SPLIT_K-1, T, R]`` fp32,
uninitialised), then each takes a ticket from the chunk's counter (``sem``, int32 per chunk, zero
between launches); the one that draws the last ticket adds the other splits' partials into
``H_s`` and sets the counter back to zero. The barrier before the ticket makes the program's
stores precede it, and the ticket's acquire-release atomic orders them before the last program's
loads, which bypass L1 (``.cg``). Without ``TICKETS`` the splits add atomically into a
zero-filled ``H_s`` (``_common.SHRINK_TICKETS`` says which).

With ``ROW_SPLIT`` (configs with ``SPLIT_K`` = 1 only) a chunk is split over rows instead: each
program owns ``BLOCK_M`` of its rows and all of K (the launch grid's second axis counts row
blocks), so there are no partial sums to meet and no ticket tail; every program then reads all of
``A_i``, from L2. Those configs leave A_i's loads to the compiler's pipeline (``PREFETCH_A`` off):
on an H100 at 8 x 512 tokens, rank 16, a probe of this scheme was 1.13-1.22x faster than the
split-K shrink, while with the hand look-ahead it was not (``benchmarks/shrink_rows.py``). In this
kernel they were 1.04x faster than the table's split-K config at K = 14336 and no faster in a
layer's fwd+bwd, so they stay candidates (``_common.CANDIDATE_CONFIGS``).
"""
import triton
import triton.language as tl

from ._common import (CANDIDATE_CONFIGS, CONFIG_DEFAULTS, cfg, chunk_meta, configs, dropout_key, dropout_pos, mma, quick_bench,
                      seq_stride, weight_ptrs)

# Configs that do not say (the interpreter's, a table tuned before these switches existed) split
# over K and load A_i's tiles one iteration ahead by hand.
CONFIG_DEFAULTS["lora_shrink"] = {"ROW_SPLIT": False, "PREFETCH_A": True}
ROW_SPLIT_CONFIGS = [cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=1, ROW_SPLIT=True, PREFETCH_A=False, num_warps=w, num_stages=s)
                     for (bm, bk, w, s) in [(32, 256, 4, 4), (16, 256, 2, 4), (16, 512, 4, 3), (16, 256, 4, 4),
                                            (32, 128, 4, 5)]]
SHRINK_CONFIGS = configs(
    full=[cfg(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, ROW_SPLIT=False, PREFETCH_A=True, num_warps=w, num_stages=s)
          for (bm, bk, sk, w, s) in [(16, 256, 4, 4, 3), (32, 128, 4, 4, 3), (32, 256, 4, 4, 3),
                                     (32, 128, 8, 4, 4), (64, 128, 4, 4, 3), (64, 128, 8, 8, 3),
                                     (64, 64, 8, 4, 4), (32, 256, 1, 8, 3), (64, 256, 2, 8, 3),
                                     (128, 128, 8, 8, 3), (128, 64, 8, 8, 4)]]
    + (ROW_SPLIT_CONFIGS if CANDIDATE_CONFIGS else []),
    interp=cfg(BLOCK_M=16, BLOCK_K=32, SPLIT_K=2, ROW_SPLIT=False, PREFETCH_A=True, num_warps=4, num_stages=1))


@triton.autotune(configs=SHRINK_CONFIGS, key=["K", "R", "T_HINT"], reset_to_zero=["h_ptr"],
                  do_bench=quick_bench)
@triton.jit(do_not_specialize=["seed", "width"])
def lora_shrink_kernel(x_ptr, h_ptr, part_ptr, sem_ptr, meta_ptr, ptrs_ptr, w_ref, K, T, stride_xm, T_HINT, seed,
                       streams_ptr, width, R: tl.constexpr, ALIGN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       DOT_PREC: tl.constexpr, TICKETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, ROW_SPLIT: tl.constexpr, PREFETCH_A: tl.constexpr):
    pid = tl.program_id(0)
    # With ROW_SPLIT axis 1 counts BLOCK_M-row blocks of the chunk (SPLIT_K is 1), else K slices.
    pid_k = 0 if ROW_SPLIT else tl.program_id(1)
    lo, hi, rank, roff, seg0, adapter, p, c = chunk_meta(meta_ptr, pid, ALIGN)
    a_ptr, b_ptr = weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN)
    key = dropout_key(seed, streams_ptr, ptrs_ptr, adapter)
    stride = seq_stride(meta_ptr, pid)

    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    rr = tl.arange(0, R)
    r_ok = rr < rank
    kk = tl.arange(0, BLOCK_K)
    slice_len = tl.cast(T, tl.int64) * R  # one split's partial sums in ``part``
    if TICKETS and pid_k > 0:
        out_ptr = part_ptr + (pid_k - 1) * slice_len
    else:
        out_ptr = h_ptr
    if ROW_SPLIT:
        m_lo = lo + tl.program_id(1) * BLOCK_M
        m_hi = tl.minimum(hi, m_lo + BLOCK_M)
    else:
        m_lo = lo
        m_hi = hi
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        # PREFETCH_A: A_i's tiles (read through a pointer from the table) are loaded one
        # iteration ahead by hand, so their latency hides behind the dot; without it the compiler's
        # pipeline schedules them with X's (faster with ROW_SPLIT on the H100: shrink_rows.py).
        if PREFETCH_A:
            a_next = tl.load(a_ptr + rr[None, :] * K + (k_lo + kk)[:, None],
                             mask=r_ok[None, :] & ((k_lo + kk) < k_hi)[:, None], other=0.0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + kk
            col_ok = cols < k_hi
            if PREFETCH_A:
                a = a_next  # [BLOCK_K, R] = A_iᵀ tile
                nxt = cols + BLOCK_K
                a_next = tl.load(a_ptr + rr[None, :] * K + nxt[:, None],
                                 mask=r_ok[None, :] & (nxt < k_hi)[:, None], other=0.0)
            else:
                a = tl.load(a_ptr + rr[None, :] * K + cols[:, None], mask=r_ok[None, :] & col_ok[:, None], other=0.0)
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = tl.rand(key, dropout_pos(rows - seg0, width, stride)[:, None] * K + cols[None, :]) >= p
                x = tl.where(keep, x, 0.0)
            acc = mma(x, a.to(x.dtype), acc, DOT_PREC)
        acc = acc * c
        if TICKETS or SPLIT_K == 1:
            tl.store(out_ptr + rows64[:, None] * R + rr[None, :], acc, mask=row_ok[:, None])
        else:
            tl.atomic_add(out_ptr + rows64[:, None] * R + rr[None, :], acc, mask=row_ok[:, None], sem="relaxed")
    if TICKETS and SPLIT_K > 1:
        tl.debug_barrier()  # every thread's stores before the ticket (whose release covers them)
        ticket = tl.atomic_add(sem_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:  # the chunk's last split: the others' partials are in
            for m0 in range(lo, hi, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                ok = (rows < hi)[:, None]
                offs = rows.to(tl.int64)[:, None] * R + rr[None, :]
                acc = tl.load(h_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
                for split in tl.static_range(1, SPLIT_K):
                    acc += tl.load(part_ptr + (split - 1) * slice_len + offs, mask=ok, other=0.0,
                                   cache_modifier=".cg")
                tl.store(h_ptr + offs, acc, mask=ok)
            tl.atomic_xchg(sem_ptr + pid, 0, sem="relaxed")  # ready for the next launch
