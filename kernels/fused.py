"""Fused multi-LoRA for training: launcher, segment tables and the autograd Function.

``fused_multi_lora`` adds ``Σ_i scale_i · dropout(X_i) A_iᵀ B_iᵀ`` into ``base_out`` in place,
for adapters of different ranks in one launch per pass. Four kernels, each one pass over the
big tensors (the LoRA products are memory-bound: rank ≪ in, out):

=============  ===============================================  ==========================
kernel         computes                                         big tensors touched
=============  ===============================================  ==========================
lora_shrink    ``H_s = c·(mask⊙X) Aᵀ``  (fwd)                   X read
lora_expand    ``Y += H_s Bᵀ``          (fwd)                   Y read + write (in place)
lora_bwd_dy    ``G = dY B``, ``dB = dYᵀ H_s``  (bwd)            dY read once for both
lora_bwd_dx    ``dX = c·(G A)⊙mask``, ``dA = c·Gᵀ(mask⊙X)``     X read, dX written
=============  ===============================================  ==========================

with ``c_i = scale_i / (1 - p_i)``. ``H_s`` and ``G`` are small fp32 ``[T, R]`` buffers
(``R`` = the largest rank padded to a power of two ≥ 16). The weights are read in place through
their addresses in the chunk table (no packing copy); dA and dB are accumulated in one fp32
workspace laid out so that each ``dA_i``/``dB_i`` is a contiguous block, returned as views.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton

from . import _common
from ._common import INTERPRET, N_META, SEED_ADD, SEED_MUL, TunedLauncher
from .dropout import dropout_mask_kernel
from .lora_bwd_dx import lora_bwd_dx_kernel
from .lora_bwd_dy import lora_bwd_dy_kernel
from .lora_expand import lora_expand_kernel
from .lora_shrink import lora_shrink_kernel
from .reference import check_segments

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128


@dataclass(frozen=True)
class _Plan:
    n: int
    ranks: Tuple[int, ...]
    roffs: Tuple[int, ...]  # offset of adapter i on the packed rank axis (Σr)
    R: int                  # rank axis of H_s / G: max rank padded to a power of two ≥ 16
    table: torch.Tensor     # [n_chunks, N_META] int64, on the device (no per-step content)
    chunk: int              # rows per chunk (lora_bwd_dy's BLOCK_M)
    has_dropout: bool
    t_hint: int             # autotune key: tokens rounded up to a power of two
    tokens: int
    out_features: int


@functools.lru_cache(maxsize=512)
def _table(offs, ranks, roffs, scales, ps, ptrs_a, ptrs_b, chunk, device):
    """Chunk table (cached: every step of every layer sees the same segments and weights).

    Uploaded from pinned memory without blocking: a plain host-to-device copy of pageable
    memory waits for the GPU to drain, which once per layer would serialise the whole step."""
    f32 = np.array(list(scales) + list(ps), dtype=np.float32).view(np.int32).astype(np.int64)
    n = len(ranks)
    rows = []
    for i in range(n):
        lo, hi = offs[i], offs[i + 1]
        for c in range(lo, hi, chunk):
            rows.append((i, c, min(c + chunk, hi), ranks[i], roffs[i], lo, f32[i], f32[n + i],
                         ptrs_a[i], ptrs_b[i]))
    host = torch.from_numpy(np.array(rows, dtype=np.int64).reshape(-1, N_META))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p):
    if not isinstance(x, torch.Tensor) or not isinstance(base_out, torch.Tensor):
        raise ValueError("x and base_out must be tensors")
    check_segments(x, lora_a, lora_b, seg_offsets, scales)
    if x.dtype not in _DTYPES:
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
            if w.dtype not in _DTYPES:
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


def _make_plan(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training) -> _Plan:
    offs = tuple(int(o) for o in seg_offsets)
    ranks = tuple(int(a.shape[0]) for a in lora_a)
    roffs = tuple(int(v) for v in np.cumsum((0,) + ranks[:-1]))
    ps = tuple(float(p) for p in dropout_p) if (training and dropout_p is not None) else (0.0,) * len(ranks)
    has_dropout = any(p > 0.0 for p in ps)
    if has_dropout:
        longest = max(hi - lo for lo, hi in zip(offs, offs[1:]))
        if longest * x.shape[1] >= 2 ** 31:
            raise ValueError("a segment of more than 2**31 elements cannot use in-kernel dropout")
    chunk = _common.CHUNK_ROWS
    table = _table(offs, ranks, roffs, tuple(float(s) for s in scales), ps,
                   tuple(a.data_ptr() for a in lora_a), tuple(b.data_ptr() for b in lora_b), chunk, x.device)
    R = max(16, triton.next_power_of_2(max(ranks)))
    return _Plan(len(ranks), ranks, roffs, R, table, chunk, has_dropout,
                 triton.next_power_of_2(max(x.shape[0], 1)), offs[-1], int(lora_b[0].shape[0]))


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, not tf32


_SHRINK = TunedLauncher(lora_shrink_kernel)
_EXPAND = TunedLauncher(lora_expand_kernel)
_BWD_DY = TunedLauncher(lora_bwd_dy_kernel)
_BWD_DX = TunedLauncher(lora_bwd_dx_kernel)


class _FusedMultiLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_out, plan: _Plan, seed: int, *weights):
        x = x if x.stride(1) == 1 else x.contiguous()
        T, K = x.shape
        N = base_out.shape[1]
        nc, w_ref = plan.table.shape[0], weights[0]
        h = torch.zeros(T, plan.R, device=x.device, dtype=torch.float32)
        prec = _dot_prec(x.dtype)
        sig = (x.dtype, w_ref.dtype, plan.R, plan.t_hint, prec)
        _SHRINK(lambda m: (nc, m["SPLIT_K"]), (sig, K, plan.has_dropout),
                x, h, plan.table, w_ref, K, x.stride(0), plan.t_hint, seed,
                R=plan.R, HAS_DROPOUT=plan.has_dropout, DOT_PREC=prec)
        _EXPAND(lambda m: (nc, triton.cdiv(N, m["BLOCK_N"])), (sig, N),
                h, base_out, plan.table, w_ref, N, base_out.stride(0), plan.t_hint, R=plan.R, DOT_PREC=prec)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, h, *weights)  # the table holds the weights' addresses
        ctx.plan, ctx.seed = plan, seed
        return base_out

    @staticmethod
    def backward(ctx, dy):
        x, h, *weights = ctx.saved_tensors
        plan: _Plan = ctx.plan
        n, dt = plan.n, x.dtype
        need = ctx.needs_input_grad
        need_x, need_a, need_b = need[0], any(need[4:4 + n]), any(need[4 + n:])
        d_base = dy if need[1] else None
        if not (need_x or need_a or need_b):
            return (None, d_base, None, None) + (None,) * (2 * n)
        dy = dy.to(dt)
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        T, K = x.shape
        N = dy.shape[1]
        nc, w_ref, sum_r = plan.table.shape[0], weights[0], sum(plan.ranks)
        prec = _dot_prec(dt)
        sig = (dt, w_ref.dtype, plan.R, plan.t_hint, prec)
        # One zero-filled fp32 workspace: G [T, R] | dA [Σr, K] | dB blocks [out, r_i] each.
        ws = torch.zeros(T * plan.R + sum_r * (K * need_a + N), device=x.device, dtype=torch.float32)
        g = ws[:T * plan.R].view(T, plan.R)
        da = ws[T * plan.R:T * plan.R + sum_r * K * need_a]
        db = ws[T * plan.R + sum_r * K * need_a:]
        _BWD_DY(lambda m: (nc, m["SPLIT_N"]), (sig, N, plan.chunk),
                dy, h, g, db, plan.table, w_ref, N, dy.stride(0), plan.t_hint,
                R=plan.R, DOT_PREC=prec, BLOCK_M=plan.chunk)
        dx = torch.empty_like(x) if need_x else None
        if need_x or need_a:
            dx_arg = dx if need_x else x        # never written when COMPUTE_DX is off
            da_arg = da if need_a else g        # never written when COMPUTE_DA is off
            _BWD_DX(lambda m: (nc, triton.cdiv(K, m["BLOCK_K"])), (sig, K, plan.has_dropout, need_x, need_a),
                    x, g, dx_arg, da_arg, plan.table, w_ref, K, x.stride(0), dx_arg.stride(0),
                    plan.t_hint, ctx.seed, R=plan.R, HAS_DROPOUT=plan.has_dropout, COMPUTE_DX=need_x,
                    COMPUTE_DA=need_a, DOT_PREC=prec)
        wdt = w_ref.dtype                       # one conversion for all adapters, then views
        da = da.to(wdt) if need_a else None
        db = db.to(wdt) if need_b else None
        grads_a = [da[ro * K:(ro + r) * K].view(r, K) if need[4 + i] else None
                   for i, (r, ro) in enumerate(zip(plan.ranks, plan.roffs))]
        grads_b = [db[ro * N:(ro + r) * N].view(N, r) if need[4 + n + i] else None
                   for i, (r, ro) in enumerate(zip(plan.ranks, plan.roffs))]
        return (dx, d_base, None, None, *grads_a, *grads_b)


# Plans by (segments, scales, dropout, weight addresses and shapes, dtypes, device): a layer sees
# the same ones every step, so validation and the table are paid once, not per call.
_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_MAX_PLANS = 1024


def _plan_key(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training) -> tuple:
    return (tuple(int(o) for o in seg_offsets), tuple(float(s) for s in scales),
            tuple(float(p) for p in dropout_p) if training and dropout_p is not None else None,
            x.shape[1], x.dtype, x.device, _common.CHUNK_ROWS,
            tuple((a.data_ptr(), a.shape, a.stride(), a.dtype, a.device) for a in lora_a),
            tuple((b.data_ptr(), b.shape, b.stride(), b.dtype, b.device) for b in lora_b))


def _check_call(x, base_out, plan: _Plan) -> None:
    """What a cached plan does not cover: this call's activations."""
    if x.dim() != 2 or x.shape[0] != plan.tokens:
        raise ValueError(f"x must be [{plan.tokens}, in_features], got shape {tuple(x.shape)}")
    if base_out.dtype != x.dtype or base_out.device != x.device:
        raise ValueError(f"base_out ({base_out.dtype}, {base_out.device}) must match x ({x.dtype}, {x.device})")
    if base_out.dim() != 2 or tuple(base_out.shape) != (x.shape[0], plan.out_features):
        raise ValueError(f"base_out must be [{x.shape[0]}, {plan.out_features}], got {tuple(base_out.shape)}")
    if base_out.shape[0] and base_out.stride(1) != 1:
        raise ValueError("base_out must have unit stride along features (it is written in place)")


def fused_multi_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: Sequence[torch.Tensor],
                     lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
                     dropout_p: Optional[Sequence[float]] = None, training: bool = False,
                     seed: int = 0) -> torch.Tensor:
    """Add ``scale_i · dropout(x_i) A_iᵀ B_iᵀ`` for every adapter segment into ``base_out`` in place.

    Returns ``base_out``; differentiable w.r.t. ``x``, ``base_out`` and every ``A_i``, ``B_i``.
    Dropout (``training=True`` with ``dropout_p``) is drawn in-kernel from ``seed``; the same
    ``seed`` gives the same mask (see :func:`dropout_mask`).
    """
    if len(lora_a) == 0 or not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        _validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
        return base_out
    wdt = lora_a[0].dtype
    if any(w.dtype != wdt or not w.is_contiguous() for w in (*lora_a, *lora_b)):
        _validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
        # The kernels read every weight through one pointer type: give them one dtype and layout
        # (a copy per call; the gradients flow back through .to() to the originals).
        lora_a = [a.to(x.dtype).contiguous() for a in lora_a]
        lora_b = [b.to(x.dtype).contiguous() for b in lora_b]
    key = _plan_key(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training)
    plan = _PLANS.get(key)
    if plan is None:
        _validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
        plan = _make_plan(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _check_call(x, base_out, plan)
    return _FusedMultiLoRA.apply(x, base_out, plan, int(seed) % 2 ** 31, *lora_a, *lora_b)


def dropout_mask(seed: int, seg_offsets: Sequence[int], dropout_p: Sequence[float], in_features: int,
                 device="cuda") -> list:
    """The keep-masks ``fused_multi_lora(..., training=True, seed=seed)`` draws: one bool
    ``[T_i, in_features]`` tensor per adapter (all True where ``p_i = 0``)."""
    offs = tuple(int(o) for o in seg_offsets)
    n = len(offs) - 1
    if len(dropout_p) != n:
        raise ValueError(f"dropout_p needs {n} entries, got {len(dropout_p)}")
    T = offs[-1]
    device = torch.device(device)
    mask = torch.empty(T, in_features, dtype=torch.int8, device=device)
    if T:
        table = _table(offs, (0,) * n, (0,) * n, (1.0,) * n, tuple(float(p) for p in dropout_p),
                       (0,) * n, (0,) * n, _common.CHUNK_ROWS, device)
        dropout_mask_kernel[lambda m: (table.shape[0], triton.cdiv(in_features, m["BLOCK_K"]))](
            mask, table, in_features, int(seed) % 2 ** 31)
    mask = mask.bool()
    return [mask[offs[i]:offs[i + 1]] for i in range(n)]
