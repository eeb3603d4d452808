"""A frozen linear and its multi-LoRA deltas as one autograd node, with gradients for every A_i, B_i.

``fused_multi_lora`` keeps the contract of a LoRA op that adds into a base output someone else
computed; autograd then sums its dX with the base's (one more pass over dX), and the delta is
added into Y by a second read and write. When the caller also owns the base linear, as a
LoRA layer does, ``fused_linear_multi_lora`` runs both in one node: the LoRA kernels store their
Y and dX deltas and cuBLAS adds into them in its epilogue (``addmm_``, beta 1), the same order
the engine's sink path uses (``apply_linear_multi_lora``), but with plain weights whose gradients
autograd returns, like any other op.

The engine's layers call ``apply_linear_multi_lora`` instead: the same node over a plan with a
gradient sink (dA/dB added into the adapters' fp32 buffers, no gradients returned). Both run in
one of three orders (``LINEAR_*``, below); ``lora_gemm`` is alto's own GEMM for the third.

    >>> y = fused_linear_multi_lora(x, W, [A0, A1], [B0, B1], [0, 512, 1024], [2.0, 1.0])
    >>> torch.autograd.grad(y, [x, A0, A1, B0, B1], dy)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton

from . import _common
from ._common import function_apply
from .fused import _dot_prec, _lora_backward, _lora_forward, _seed_and_drop, _take_g, _weight_grads, cached_plan
from .lora_gemm import lora_gemm_kernel
from .plan import MultiLoRAPlan, upload, validate

__all__ = ["apply_linear_multi_lora", "fused_linear_multi_lora", "gemm_supported", "lora_gemm"]


# How the one-node linear orders its base GEMMs and LoRA kernels (``_LinearMultiLoRA``).
LINEAR_ADDS, LINEAR_EPILOGUE, LINEAR_GEMM = "adds", "epilogue", "gemm"


# The static segment walk of lora_gemm_kernel unrolls up to this many guarded steps.
MAX_STATIC_SEGS = 8


def _segment_tables(plan: MultiLoRAPlan) -> tuple:
    """``(row_segs, segs, SEGS)`` for ``lora_gemm``, built once per plan from its host offsets:
    int32 ``[T]`` segment of every row, int32 ``[S, 3]`` (first row, end row, first chunk) of
    each non-empty segment, and the most segments any 256-row window holds (rounded up to a
    power of two; 0 above ``MAX_STATIC_SEGS``: the kernel's dynamic walk)."""
    got = plan.derived.get("segments")
    if got is None:
        offs, chunk = plan.offsets, plan.chunk
        rows, first = [], 0
        for lo, hi in zip(offs, offs[1:]):
            if hi > lo:
                rows.append((lo, hi, first))
                first += -(-(hi - lo) // chunk)
        segs = np.array(rows, dtype=np.int32).reshape(-1, 3)
        row_segs = np.repeat(np.arange(len(rows), dtype=np.int32), segs[:, 1] - segs[:, 0])
        # Row tiles (BLOCK_M ≤ 256, a power of two) lie inside 256-row windows; segments are monotone.
        starts = np.arange(0, len(row_segs), 256)
        ends = np.minimum(starts + 256, len(row_segs)) - 1
        most = int((row_segs[ends] - row_segs[starts]).max()) + 1 if len(row_segs) else 1
        most = 1 << (most - 1).bit_length()
        dev = plan.table.device
        got = (upload(torch.from_numpy(row_segs), dev), upload(torch.from_numpy(segs), dev),
               most if most <= MAX_STATIC_SEGS else 0)
        plan.derived["segments"] = got
    return got


def gemm_supported(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``lora_gemm`` can take these operands: TMA needs 16-byte aligned bases and rows."""
    if not (a.is_cuda or _common.INTERPRET) or a.dtype != weight.dtype:
        return False
    if a.is_cuda and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    es = a.element_size()
    return (weight.dim() == 2 and all((d * es) % 16 == 0 for d in weight.shape)
            and all(t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, weight)))


_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if _common.INTERPRET or device.type != "cuda":
        return 4
    n = _NUM_SMS.get(device.index)
    if n is None:
        n = _NUM_SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def lora_gemm(plan: MultiLoRAPlan, a: torch.Tensor, weight: torch.Tensor, skinny: torch.Tensor,
              forward: bool, w_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a Wᵀ + H_s B_aᵀ`` (``forward``: a = X, skinny = H_s) or ``a W + c_a G A_a`` (a = dY,
    skinny = G), the LoRA term of each row from its adapter; one kernel (``lora_gemm.py``).
    ``w_ref``: a LoRA weight of the pointer table's dtype (default: the sink plan's first)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = weight.shape[0] if forward else weight.shape[1]
    if weight.shape[1 if forward else 0] != K or M != plan.tokens or skinny.shape != (M, plan.R):
        raise ValueError(f"lora_gemm: a {tuple(a.shape)}, weight {tuple(weight.shape)}, skinny "
                         f"{tuple(skinny.shape)} do not fit the plan ({plan.tokens} rows, R={plan.R})")
    if a.data_ptr() % 16:  # a view at an odd offset (dY from a slice): TMA needs an aligned base
        a = a.clone()
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    block = [1, 1]  # set per config by lora_gemm._block_shapes
    descs = (TensorDescriptor.from_tensor(a, block), TensorDescriptor.from_tensor(weight, block),
             TensorDescriptor.from_tensor(c, block))
    sms = _num_sms(a.device)
    grid = lambda m: (min(sms, triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])),)
    row_segs, segs, n_segs = _segment_tables(plan)
    lora_gemm_kernel[grid](*descs, skinny, row_segs, segs, plan.table, plan.ptrs,
                           plan.weights[0] if w_ref is None else w_ref, M, N, K,
                           plan.R, forward, n_segs, sms, _dot_prec(a.dtype))
    return c


class _LinearMultiLoRA(torch.autograd.Function):
    """A frozen linear and the LoRA deltas of a sink plan covering all its rows, as one node.

    ``mode``: ``LINEAR_GEMM`` runs the base GEMMs as alto's own Triton GEMMs with the LoRA
    expand in their epilogue (``lora_gemm``; the backward's only where the plan has no dropout).
    ``LINEAR_EPILOGUE`` (no bias): the LoRA kernels store their Y and dX deltas and cuBLAS adds
    into them in place (``addmm_``, beta 1), reading each in its compute-bound epilogue.
    ``LINEAR_ADDS``: the base GEMMs come first and the LoRA kernels read and add into them
    (``lora_expand`` in place, ``lora_bwd_dx`` with ``ADD_DX``): two memory-bound re-reads."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: MultiLoRAPlan, seed: int, drop: tuple, mode: str, *weights):
        x = x if x.stride(1) == 1 else x.contiguous()
        w_ref = plan.weights[0] if plan.grad_sink else weights[0]
        with_g = any(ctx.needs_input_grad)  # the expand zero-fills the backward's G
        if mode == LINEAR_GEMM:  # no expand kernel: the backward fills its G
            h, ctx.g = _lora_forward(plan, x, None, seed, drop, w_ref)
            y = lora_gemm(plan, x, weight, h, forward=True, w_ref=w_ref)
        elif mode == LINEAR_EPILOGUE:
            y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
            h, ctx.g = _lora_forward(plan, x, y, seed, drop, w_ref, accumulate=False, with_g=with_g)
            y.addmm_(x, weight.t())
        else:
            y = torch.nn.functional.linear(x, weight, bias)
            h, ctx.g = _lora_forward(plan, x, y, seed, drop, w_ref, with_g=with_g)
        # the weights too: the pointer table holds their addresses (and autograd checks their versions)
        ctx.save_for_backward(x, h, weight, *(() if plan.grad_sink else weights))
        ctx.plan, ctx.seed, ctx.drop, ctx.mode = plan, seed, drop, mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, weight, *weights = ctx.saved_tensors
        plan: MultiLoRAPlan = ctx.plan
        sink, n = plan.grad_sink, plan.n
        need = ctx.needs_input_grad
        need_x = need[0]
        need_a = sink or any(need[7:7 + n])
        need_b = sink or any(need[7 + n:])
        tail = (None,) * (1 if sink else 2 * n)
        if not (need_x or need_a or need_b):
            return (None,) * 7 + tail
        dy = dy.to(x.dtype)
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        w_ref = plan.weights[0] if sink else weights[0]
        if ctx.mode == LINEAR_GEMM and not plan.has_dropout:
            _, da, db, g = _lora_backward(plan, x, h, dy, w_ref, ctx.seed, ctx.drop, False, True, g=_take_g(ctx))
            dx = lora_gemm(plan, dy, weight, g, forward=False, w_ref=w_ref) if need_x else None
        elif ctx.mode in (LINEAR_GEMM, LINEAR_EPILOGUE):
            dx, da, db, _ = _lora_backward(plan, x, h, dy, w_ref, ctx.seed, ctx.drop, need_x, True, g=_take_g(ctx))
            if need_x:
                dx.addmm_(dy, weight)
        else:
            dx = torch.mm(dy, weight) if need_x else None
            dx, da, db, _ = _lora_backward(plan, x, h, dy, w_ref, ctx.seed, ctx.drop, need_x, True, dx=dx,
                                           g=_take_g(ctx))
        if sink:
            return (dx,) + (None,) * 7
        return (dx, None, None, None, None, None, None,
                *_weight_grads(plan, da, db, x.shape[1], dy.shape[1], w_ref.dtype, need[7:]))


_linear_apply = function_apply(_LinearMultiLoRA)


def apply_linear_multi_lora(plan: MultiLoRAPlan, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, seed: int = 0,
                            streams: Optional[torch.Tensor] = None, width: Optional[int] = None,
                            epilogue: bool = True, gemm: bool = False) -> torch.Tensor:
    """``linear(x, weight, bias) + Σ_i scale_i · dropout(x_i) A_iᵀ B_iᵀ`` for a frozen ``weight``
    and a plan with a gradient sink whose segments cover every row of ``x``. The same numbers as
    ``apply_multi_lora(plan, x, linear(x, weight, bias))`` up to one rounding of Y and dX, each
    summed once instead of twice (arguments as ``apply_multi_lora``). ``epilogue``: the base GEMMs
    add into the LoRA deltas (``addmm_``) rather than the LoRA kernels into the GEMMs' outputs
    (used without a bias only; ``_LinearMultiLoRA``). ``gemm``: the base GEMMs are alto's own, with
    the LoRA expand in their epilogue (``lora_gemm``; without a bias, on Hopper or the
    interpreter, where ``gemm_supported``; elsewhere ``epilogue`` decides)."""
    if not plan.grad_sink:
        raise ValueError("apply_linear_multi_lora needs a plan with a gradient sink (prepare_multi_lora(grad_a=...))")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("weight/bias require grad: the fused linear computes no gradient for them")
    if tuple(weight.shape) != (plan.out_features, plan.in_features) or weight.dtype != plan.dtype:
        raise ValueError(f"weight must be [{plan.out_features}, {plan.in_features}] {plan.dtype}, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    plan.check_input(x)
    if plan.tokens == 0:
        return torch.nn.functional.linear(x, weight, bias)
    seed, drop = _seed_and_drop(plan, x, seed, streams, width)
    if gemm and bias is None and gemm_supported(x if x.stride(1) == 1 else x.contiguous(), weight):
        mode = LINEAR_GEMM
    else:
        mode = LINEAR_EPILOGUE if epilogue and bias is None else LINEAR_ADDS
    return _linear_apply(x, weight, bias, plan, seed, drop, mode, plan.sink_token)


def fused_linear_multi_lora(x: torch.Tensor, weight: torch.Tensor, lora_a: Sequence[torch.Tensor],
                            lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
                            bias: Optional[torch.Tensor] = None, dropout_p: Optional[Sequence[float]] = None,
                            training: bool = False, seed: int = 0, gemm: bool = False) -> torch.Tensor:
    """``linear(x, weight, bias) + Σ_i scale_i · dropout(x_i) A_iᵀ B_iᵀ`` over the segments of ``x``.

    ``weight`` (and ``bias``) are frozen: they must not require grad. Differentiable w.r.t. ``x``
    and every ``A_i``, ``B_i``. Dropout as :func:`fused_multi_lora` (the same ``seed`` draws the
    same masks). ``gemm``: the base GEMMs are alto's own with the LoRA expand in their epilogue
    (``lora_gemm``; no bias, Hopper or the interpreter), otherwise cuBLAS's.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D [out_features, in_features] tensor")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("weight/bias require grad: fused_linear_multi_lora computes no gradient for them "
                         "(freeze the base, or use fused_multi_lora on your own base output)")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x must be [tokens, {weight.shape[1]}] for weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must be {x.dtype} on {x.device}, like x")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be a {x.dtype} [{weight.shape[0]}] tensor")
    if len(lora_a) == 0 or x.shape[0] == 0:
        y = torch.nn.functional.linear(x, weight, bias)
        validate(x, y, lora_a, lora_b, seg_offsets, scales, dropout_p)
        return y
    if lora_b[0].dim() == 2 and lora_b[0].shape[0] != weight.shape[0]:
        raise ValueError(f"lora_b[0] is [{lora_b[0].shape[0]}, ...] but weight has {weight.shape[0]} outputs")
    wdt = lora_a[0].dtype
    if any(w.dtype != wdt or not w.is_contiguous() for w in (*lora_a, *lora_b)):
        validate(x, x.new_empty(x.shape[0], weight.shape[0]), lora_a, lora_b, seg_offsets, scales, dropout_p)
        lora_a = [a.to(x.dtype).contiguous() for a in lora_a]  # one pointer type (fused_multi_lora)
        lora_b = [b.to(x.dtype).contiguous() for b in lora_b]
    plan = cached_plan(x, None, lora_a, lora_b, seg_offsets, scales, dropout_p, training)
    plan.check_input(x)
    seed, drop = _seed_and_drop(plan, x, seed, None, None)
    if gemm and bias is None and gemm_supported(x if x.stride(1) == 1 else x.contiguous(), weight):
        mode = LINEAR_GEMM
    else:
        mode = LINEAR_EPILOGUE if bias is None else LINEAR_ADDS
    return _linear_apply(x, weight, bias, plan, seed, drop, mode, *lora_a, *lora_b)
