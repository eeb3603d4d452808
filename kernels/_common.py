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

# One chunk-table row: adapter, first/past-last token, rank, row offset in the packed A / Bᵀ,
# first token of the adapter's segment (dropout offsets are segment-local), Philox seed, and
# the bit patterns of scale and dropout p. (constexpr: Triton reads these globals in kernels)
N_META = 9
META_COLS = tl.constexpr(N_META)

# Rows per chunk: the unit of work of every kernel (block sub-loops run inside a chunk).
# Larger chunks mean fewer atomic partial sums for dA/dB; smaller ones more parallelism.
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
def chunk_meta(meta_ptr, pid):
    """Row ``pid`` of the chunk table: ``lo, hi, rank, roff, seg0, seed, p, c`` where
    ``c = scale / (1 - p)`` (LoRA scale times inverted-dropout gain)."""
    m = meta_ptr + pid * META_COLS
    p = tl.load(m + 8).to(tl.float32, bitcast=True)
    c = tl.load(m + 7).to(tl.float32, bitcast=True) / (1.0 - p)
    return tl.load(m + 1), tl.load(m + 2), tl.load(m + 3), tl.load(m + 4), tl.load(m + 5), tl.load(m + 6), p, c
