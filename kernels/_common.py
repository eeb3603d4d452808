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

# One chunk-table row (int64): adapter index, first/past-last token, rank, row offset of the
# adapter in the packed rank axis, first token of its segment (dropout offsets are segment-local),
# and the bit patterns of scale and dropout p. Nothing in a row names a layer or a step, so one
# table serves every layer of a batch layout. Each layer adds its own *pointer table*
# ``[n, PTR_COLS]``: the addresses of A_i and B_i (read in place: no packing copy) and, with a
# gradient sink, of the fp32 buffers that dA_i and dB_i are accumulated into. Both are cached:
# optimizer steps update weights in place and the dropout seed is a launch argument.
N_META = 8
META_COLS = tl.constexpr(N_META)
PTR_COLS = 4

# Per-adapter Philox keys: ``(seed * SEED_MUL + (i + 1) * SEED_ADD) mod 2**31``, computed in the
# kernels from the launch's ``seed`` and the adapter index (distinct streams per adapter).
SEED_MUL = 0x9E3779B1
SEED_ADD = 0x85EBCA6B
_SEED_MUL = tl.constexpr(SEED_MUL)
_SEED_ADD = tl.constexpr(SEED_ADD)

# Rows per chunk: the unit of work of every kernel (``lora_bwd_dy`` takes a whole chunk as one
# row block). Larger chunks mean fewer atomic partial sums for dA/dB; smaller ones more programs.
# Read at each call, so a benchmark may change it.
CHUNK_ROWS = 32 if INTERPRET else int(os.environ.get("ALTO_LORA_CHUNK", "64"))


def configs(full, interp):
    """The autotune list: ``full`` on a GPU, the single ``interp`` config under TRITON_INTERPRET
    (one config means the autotuner never benchmarks, which keeps CPU tests fast)."""
    return [interp] if INTERPRET else list(full)


def quick_bench(kernel_call, quantiles):
    """The autotuner's timer, shortened (5 ms warm-up, 20 ms of repetitions instead of 25 + 100):
    these kernels take microseconds, so 20 ms is still hundreds of runs, and a grouped step that
    meets a new shape (an adapter left, a new rank) pays seconds of tuning instead of a minute."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def t_hint(tokens: int) -> int:
    """The autotune key for a token count: a power of 4 (≥ 256), so that batches that differ by
    padding, or by an adapter or two, reuse one tuned config instead of tuning again."""
    h = 256
    while h < tokens:
        h *= 4
    return h


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
    """Row ``pid`` of the chunk table: ``lo, hi, rank, roff, seg0, adapter, p, c`` with
    ``c = scale / (1 - p)`` (LoRA scale times inverted-dropout gain)."""
    m = meta_ptr + pid * META_COLS
    p = tl.load(m + 7).to(tl.int32).to(tl.float32, bitcast=True)
    c = tl.load(m + 6).to(tl.int32).to(tl.float32, bitcast=True) / (1.0 - p)
    return (tl.load(m + 1).to(tl.int32), tl.load(m + 2).to(tl.int32), tl.load(m + 3).to(tl.int32),
            tl.load(m + 4).to(tl.int32), tl.load(m + 5).to(tl.int32), tl.load(m), p, c)


@triton.jit
def weight_ptrs(ptrs_ptr, adapter, w_ref):
    """``A_i``, ``B_i`` of adapter ``adapter``, typed like ``w_ref`` (all weights share a dtype)."""
    wty = tl.pointer_type(w_ref.dtype.element_ty)
    row = ptrs_ptr + adapter * 4
    return tl.load(row).to(wty), tl.load(row + 1).to(wty)


@triton.jit
def grad_sink_ptrs(ptrs_ptr, adapter):
    """The fp32 buffers that ``dA_i`` and ``dB_i`` are accumulated into (gradient sink)."""
    row = ptrs_ptr + adapter * 4
    return tl.load(row + 2).to(tl.pointer_type(tl.float32)), tl.load(row + 3).to(tl.pointer_type(tl.float32))


@triton.jit
def philox_key(seed, adapter):
    """Adapter ``adapter``'s dropout key for launch seed ``seed`` (see ``SEED_MUL``)."""
    s = (seed.to(tl.int64) * _SEED_MUL + (adapter.to(tl.int64) + 1) * _SEED_ADD) % 2147483648
    return s.to(tl.int32)


class TunedLauncher:
    """Autotune a kernel once per key, then launch the chosen config straight through its
    ``JITFunction``: the autotuner's own dispatch costs tens of µs of host time per launch, which
    at LoRA sizes is as much as the kernel itself. ``key`` must cover the autotuner's key and
    every constexpr that changes the best config."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.best: dict = {}

    def is_tuned(self, key) -> bool:
        return key in self.best

    def adopt(self, key, tuned_key) -> None:
        """Use ``tuned_key``'s choice for ``key`` (a variant that must not be run repeatedly)."""
        self.best[key] = self.best[tuned_key]

    def __call__(self, grid, key, *args, **kwargs) -> None:
        cfg = self.best.get(key)
        if cfg is None:
            self.kernel[grid](*args, **kwargs)
            self.best[key] = self.kernel.best_config
            return
        self.kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())
