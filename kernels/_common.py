"""Shared pieces of the multi-LoRA kernels: interpreter detection, the chunk table, configs.

Every kernel walks a host-built *chunk table*: each row names one run of at most ``CHUNK_ROWS``
consecutive tokens of a single adapter (chunks never straddle segments, as in Punica's SGMV and
Triton's grouped-GEMM tutorial), with that adapter's scalars copied in so a program reads one
row of ``META_COLS`` int32s and nothing else. Floats are stored as their int32 bit patterns so
the whole table is one small host-to-device copy per call.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
if not INTERPRET and not torch.cuda.is_available():
    # Compiled Triton needs a GPU; without one only the interpreter can run these kernels. Fail
    # here, before any kernel module is created in the wrong mode (a failed import is not cached).
    raise ImportError("alto_kernels' Triton kernels need a CUDA device or TRITON_INTERPRET=1")

# One chunk-table row (int64): adapter, first/past-last token, rank, row offset of the adapter in
# the packed rank axis, first token of its segment (dropout offsets are segment-local), Philox
# seed, the bit patterns of scale and dropout p, and the addresses of A_i and B_i (no packing
# copy of the weights per call; the table is cached, and optimizer steps update weights in place).
N_META = 11
META_COLS = tl.constexpr(N_META)

# Rows per chunk: the unit of work of every kernel (``lora_bwd_dy`` takes a whole chunk as one
# row block). Larger chunks mean fewer atomic partial sums for dA/dB; smaller ones more programs.
# Read at each call, so a benchmark may change it.
CHUNK_ROWS = 32 if INTERPRET else int(os.environ.get("ALTO_LORA_CHUNK", "128"))


def configs(full, interp):
    """The autotune list: ``full`` on a GPU, the single ``interp`` config under TRITON_INTERPRET
    (one config means the autotuner never benchmarks, which keeps CPU tests fast)."""
    return [interp] if INTERPRET else list(full)


def cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. Under the interpreter bf16 operands are widened
    first (its bf16 ``tl.dot`` is wrong in Triton 3.9 on CPU); compiled code uses them as is."""
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def chunk_meta(meta_ptr, pid, w_ref):
    """Row ``pid`` of the chunk table: ``lo, hi, rank, roff, seg0, seed, p, c, a_ptr, b_ptr``
    with ``c = scale / (1 - p)`` (LoRA scale times inverted-dropout gain) and the weight
    pointers typed like ``w_ref`` (every A_i and B_i share one dtype)."""
    m = meta_ptr + pid * META_COLS
    p = tl.load(m + 8).to(tl.int32).to(tl.float32, bitcast=True)
    c = tl.load(m + 7).to(tl.int32).to(tl.float32, bitcast=True) / (1.0 - p)
    wty = tl.pointer_type(w_ref.dtype.element_ty)
    return (tl.load(m + 1).to(tl.int32), tl.load(m + 2).to(tl.int32), tl.load(m + 3).to(tl.int32),
            tl.load(m + 4).to(tl.int32), tl.load(m + 5).to(tl.int32), tl.load(m + 6).to(tl.int32),
            p, c, tl.load(m + 9).to(wty), tl.load(m + 10).to(wty))
