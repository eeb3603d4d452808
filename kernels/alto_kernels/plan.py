"""Host side of the fused multi-LoRA kernels: validation, the chunk table, the pointer table.

Building these costs more host time than the kernels take on an H100 at LoRA sizes, so a
``MultiLoRAPlan`` is built once and reused: the chunk table depends only on the segment layout,
ranks, scales and dropout (shared by every layer of a batch), the pointer table only on the
weights' (and gradient sinks') addresses (fixed per layer while its adapters stay). Neither
holds anything that changes per step: the dropout seed is a launch argument and optimizer steps
update weights in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import triton

from . import _common
from ._common import INTERPRET, N_META, PTR_COLS
from .reference import check_segments

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128


@dataclass(frozen=True)
class MultiLoRAPlan:
    """Everything about a multi-LoRA call except its activations and seed.

    With a gradient sink (``grad_a``/``grad_b`` given to :func:`prepare_multi_lora`), backward
    adds ``dA_i``/``dB_i`` straight into those fp32 buffers and the weights are constants to
    autograd: one layer's call then carries two tensors through autograd instead of 2 + 2n.
    """

    n: int
    ranks: Tuple[int, ...]
    roffs: Tuple[int, ...]  # offset of adapter i on the packed rank axis (Σr)
    R: int                  # rank axis of H_s / G: max rank padded to a bucket (padded_rank)
    table: torch.Tensor     # [n_chunks, N_META] int64 on the device
    ptrs: torch.Tensor      # [n, PTR_COLS] int64 on the device: A_i, B_i, dA sink, dB sink, stream index
    chunk: int              # rows per chunk (lora_bwd_dy's BLOCK_M)
    has_dropout: bool
    t_hint: int             # autotune key: tokens rounded up to a power of 4 (_common.t_hint)
    tokens: int
    in_features: int
    out_features: int
    dtype: torch.dtype      # of x and base_out
    device: torch.device
    # Set only with a gradient sink: the tensors the pointer table names (kept alive by the plan)
    # and a leaf that makes autograd run the backward even when x and base_out need no grad.
    weights: Tuple[torch.Tensor, ...] = ()
    sinks: Tuple[torch.Tensor, ...] = ()
    sink_token: Optional[torch.Tensor] = None
    n_streams: int = 0      # the stream table must have more entries than the largest stream index
    offsets: Tuple[int, ...] = ()  # the segment offsets (host copy: tables derived later need no sync)
    table_align: int = 1    # the kernels' ALIGN: what every rank divides by, with the table's addresses aligned
    launch_keys: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # fused.py's per-plan memo of LaunchKeys
    derived: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # device tables built on first use (fused.py, fused_linear.py)

    @property
    def grad_sink(self) -> bool:
        return self.sink_token is not None

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or tuple(x.shape) != (self.tokens, self.in_features):
            raise ValueError(f"x must be [{self.tokens}, {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x ({x.dtype}, {x.device}) must be {self.dtype} on {self.device}")

    def check_call(self, x: torch.Tensor, base_out: torch.Tensor) -> None:
        """What the plan does not cover: this call's activations."""
        if x.dim() != 2 or tuple(x.shape) != (self.tokens, self.in_features):
            raise ValueError(f"x must be [{self.tokens}, {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.dtype or base_out.dtype != self.dtype:
            raise ValueError(f"x ({x.dtype}) and base_out ({base_out.dtype}) must be {self.dtype}")
        if x.device != self.device or base_out.device != self.device:
            raise ValueError(f"x and base_out must be on {self.device}")
        if base_out.dim() != 2 or tuple(base_out.shape) != (self.tokens, self.out_features):
            raise ValueError(f"base_out must be [{self.tokens}, {self.out_features}], got {tuple(base_out.shape)}")
        if self.tokens and base_out.stride(1) != 1:
            raise ValueError("base_out must have unit stride along features (it is written in place)")


# The padded rank axis R is a compile-time constant of every kernel: each new R compiles each
# kernel variant again (seconds apiece). Three buckets instead of every power of two mean a
# group whose largest adapter leaves rarely meets a new R; the padding is masked, costing only
# the skinny GEMMs' idle lanes (those kernels are memory-bound).
RANK_BUCKETS = (16, 64, MAX_RANK)


def padded_rank(max_rank: int) -> int:
    return next(b for b in RANK_BUCKETS if max_rank <= b)


def table_align(ranks: Sequence[int], addresses: Sequence[int]) -> int:
    """The kernels' ``ALIGN``: 8 or 4 when every rank is a multiple of it and every address in the
    pointer table is 16-byte aligned, else 1. The kernels read weights and sinks through those
    addresses and stride ``B_i``/``dB_i`` rows by the rank, none of which Triton can see: told
    this much, it vectorises those loads and the gradient atomics (scalar otherwise: 4x as many)."""
    if any(int(a) % 16 for a in addresses):
        return 1
    return next((d for d in (8, 4) if all(int(r) % d == 0 for r in ranks)), 1)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From pinned memory without blocking: a host-to-device copy of pageable memory waits for
    the GPU to drain, which once per layer would serialise the whole step."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@functools.lru_cache(maxsize=512)
def chunk_table(offs: Tuple[int, ...], ranks: Tuple[int, ...], roffs: Tuple[int, ...], scales: Tuple[float, ...],
                ps: Tuple[float, ...], chunk: int, device: torch.device,
                strides: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """One row per run of ≤ ``chunk`` tokens of one adapter (see ``_common.N_META``)."""
    f32 = np.array(list(scales) + list(ps), dtype=np.float32).view(np.int32).astype(np.int64)
    n = len(ranks)
    strides = strides or (0,) * n
    rows = []
    for i in range(n):
        lo, hi = offs[i], offs[i + 1]
        for c in range(lo, hi, chunk):
            rows.append((i, c, min(c + chunk, hi), ranks[i], roffs[i], lo, f32[i], f32[n + i], strides[i]))
    return upload(torch.from_numpy(np.array(rows, dtype=np.int64).reshape(-1, N_META)), device)


@functools.lru_cache(maxsize=4096)
def pointer_table(ptrs: Tuple[Tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    return upload(torch.tensor(ptrs, dtype=torch.int64).reshape(-1, PTR_COLS), device)


_POSITIONS: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def position_streams(n: int, device: torch.device) -> torch.Tensor:
    """The default stream table: adapter i draws stream i (int64 ``[n]``, cached per device)."""
    t = _POSITIONS.get((n, device))
    if t is None:
        t = _POSITIONS[(n, device)] = torch.arange(n, dtype=torch.int64, device=device)
    return t


def validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(base_out, torch.Tensor):
        raise ValueError("x and base_out must be tensors")
    check_segments(x, lora_a, lora_b, seg_offsets, scales)
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if base_out.dtype != x.dtype:
        raise ValueError(f"base_out dtype {base_out.dtype} must match x dtype {x.dtype}")
    out = lora_b[0].shape[0] if len(lora_b) else base_out.shape[-1]
    if base_out.dim() != 2 or tuple(base_out.shape) != (x.shape[0], out):
        raise ValueError(f"base_out must be [{x.shape[0]}, {out}], got {tuple(base_out.shape)}")
    if base_out.shape[0] and base_out.stride(1) != 1:
        raise ValueError("base_out must have unit stride along features (it is written in place)")
    if not (x.is_cuda or INTERPRET):
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    for name, ws in (("lora_a", lora_a), ("lora_b", lora_b)):
        for i, w in enumerate(ws):
            if w.device != x.device:
                raise ValueError(f"{name}[{i}] is on {w.device}, x on {x.device}")
            if w.dtype not in DTYPES:
                raise ValueError(f"{name}[{i}] must be float16, bfloat16 or float32, got {w.dtype}")
    if base_out.device != x.device:
        raise ValueError(f"base_out is on {base_out.device}, x on {x.device}")
    for i, a in enumerate(lora_a):
        if a.shape[0] > MAX_RANK:
            raise ValueError(f"adapter {i}: rank {a.shape[0]} > {MAX_RANK} is not supported")
    if dropout_p is not None:
        if len(dropout_p) != len(lora_a):
            raise ValueError(f"dropout_p needs one entry per adapter ({len(lora_a)}), got {len(dropout_p)}")
        for i, p in enumerate(dropout_p):
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"dropout_p[{i}] must be in [0, 1), got {p}")


def _validate_sinks(lora_a, lora_b, grad_a, grad_b) -> None:
    if grad_a is None or grad_b is None or len(grad_a) != len(lora_a) or len(grad_b) != len(lora_b):
        raise ValueError("grad_a and grad_b need one fp32 buffer per adapter, like lora_a and lora_b")
    for name, ws, gs in (("grad_a", lora_a, grad_a), ("grad_b", lora_b, grad_b)):
        for i, (w, g) in enumerate(zip(ws, gs)):
            if g.dtype != torch.float32 or g.shape != w.shape or g.device != w.device or not g.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous fp32 {tuple(w.shape)} tensor on {w.device}")
    wdt = lora_a[0].dtype
    if any(w.dtype != wdt or not w.is_contiguous() for w in (*lora_a, *lora_b)):
        raise ValueError("with a gradient sink, every A_i and B_i must be contiguous and of one dtype")


def prepare_multi_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: Sequence[torch.Tensor],
                       lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
                       dropout_p: Optional[Sequence[float]] = None, training: bool = False,
                       grad_a: Optional[Sequence[torch.Tensor]] = None,
                       grad_b: Optional[Sequence[torch.Tensor]] = None,
                       stream_index: Optional[Sequence[int]] = None,
                       seq_strides: Optional[Sequence[int]] = None) -> MultiLoRAPlan:
    """Validate once and build the tables for calls shaped like ``x``/``base_out``.

    Dropout identity (``_common``): adapter i's key comes from entry ``stream_index[i]`` (default
    i) of the stream table passed to ``apply_multi_lora``, and with a sequence ``width`` there its
    mask positions use ``seq_strides[i]`` (its longest sequence) as the stride between sequences.

    ``grad_a``/``grad_b`` (fp32, one per adapter, shaped like A_i/B_i) turn on the gradient
    sink: backward *adds* into them; zeroing them between optimizer steps is the caller's job.
    Weights must then be contiguous, of one dtype, and stay at their addresses (update them in
    place) for as long as the plan is used.
    """
    validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
    if len(lora_a) == 0:
        raise ValueError("a plan needs at least one adapter")
    sink = grad_a is not None or grad_b is not None
    if sink:
        _validate_sinks(lora_a, lora_b, grad_a, grad_b)
    offs = tuple(int(o) for o in seg_offsets)
    ranks = tuple(int(a.shape[0]) for a in lora_a)
    roffs = tuple(int(v) for v in np.cumsum((0,) + ranks[:-1]))
    ps = tuple(float(p) for p in dropout_p) if (training and dropout_p is not None) else (0.0,) * len(ranks)
    has_dropout = any(p > 0.0 for p in ps)
    if has_dropout:
        longest = max(hi - lo for lo, hi in zip(offs, offs[1:]))
        if longest * x.shape[1] >= 2 ** 31:
            raise ValueError("a segment of more than 2**31 elements cannot use in-kernel dropout")
    n = len(ranks)
    streams = tuple(int(i) for i in stream_index) if stream_index is not None else tuple(range(n))
    strides = tuple(int(v) for v in seq_strides) if seq_strides is not None else (0,) * n
    if len(streams) != n or len(strides) != n or min(streams) < 0 or min(strides) < 0:
        raise ValueError(f"stream_index and seq_strides need {n} non-negative entries each")
    chunk = _common.CHUNK_ROWS
    table = chunk_table(offs, ranks, roffs, tuple(float(s) for s in scales), ps, chunk, x.device, strides)
    ga = [g.data_ptr() for g in grad_a] if sink else [0] * n
    gb = [g.data_ptr() for g in grad_b] if sink else [0] * n
    ptrs = pointer_table(tuple(zip((a.data_ptr() for a in lora_a), (b.data_ptr() for b in lora_b), ga, gb, streams)),
                         x.device)
    align = table_align(ranks, (*(a.data_ptr() for a in lora_a), *(b.data_ptr() for b in lora_b), *ga, *gb))
    extra = {}
    if sink:
        extra = dict(weights=(*lora_a, *lora_b), sinks=(*grad_a, *grad_b),
                     sink_token=torch.zeros((), device=x.device, requires_grad=True))
    return MultiLoRAPlan(len(ranks), ranks, roffs, padded_rank(max(ranks)), table, ptrs,
                         chunk, has_dropout, _common.t_hint(offs[-1]), offs[-1], int(x.shape[1]),
                         int(lora_b[0].shape[0]), x.dtype, x.device, **extra, n_streams=max(streams) + 1,
                         offsets=offs, table_align=align)
