"""A frozen linear and its multi-LoRA deltas as one autograd node, with gradients for every A_i, B_i.

``fused_multi_lora`` keeps the contract of a LoRA op that adds into a base output someone else
computed; autograd then sums its dX with the base's (one more pass over dX), and the delta is
added into Y by a second read and write. When the caller also owns the base linear, as a
LoRA layer does, ``fused_linear_multi_lora`` runs both in one node: the LoRA kernels store their
Y and dX deltas and cuBLAS adds into them in its epilogue (``addmm_``, beta 1), the same order
the engine's sink path uses (``apply_linear_multi_lora``), but with plain weights whose gradients
autograd returns, like any other op.

    >>> y = fused_linear_multi_lora(x, W, [A0, A1], [B0, B1], [0, 512, 1024], [2.0, 1.0])
    >>> torch.autograd.grad(y, [x, A0, A1, B0, B1], dy)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .fused import (LINEAR_ADDS, LINEAR_EPILOGUE, LINEAR_GEMM, _LinearMultiLoRA, _seed_and_drop, cached_plan,
                    gemm_supported)
from .plan import validate

__all__ = ["fused_linear_multi_lora"]


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
    return _LinearMultiLoRA.apply(x, weight, bias, plan, seed, drop, mode, *lora_a, *lora_b)
