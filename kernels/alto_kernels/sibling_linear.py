"""Sibling frozen linears of one input (q/k/v, gate/up) and their multi-LoRA deltas as ONE node.

Each of ``apply_linear_multi_lora``'s nodes returns its own input gradient, and autograd sums the
siblings' with an add kernel each (over [tokens, in] in bf16: on the Llama-8B step, 96 of its 221
add kernels, ~3 ms). Here the siblings share one backward: the first sibling's ``lora_bwd_dx``
stores its LoRA dX, the next ones add theirs into it in fp32 (``ADD_DX``), and the base GEMMs add
``dY_j W_j`` into the same buffer in their epilogue (``addmm_``, beta 1). The forward is each
sibling's as in ``apply_linear_multi_lora`` (``LINEAR_EPILOGUE``: no bias).

    >>> q, k, v = apply_sibling_linears_multi_lora([plan_q, plan_k, plan_v], x, [Wq, Wk, Wv], [s_q, s_k, s_v])

The plans need gradient sinks (the engine's) and rows that cover all of ``x``; an output no one
uses gets no gradient (its sibling's work is skipped in the backward).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._common import function_apply
from .fused import _lora_backward, _lora_forward, _seed_and_drop
from .plan import MultiLoRAPlan

__all__ = ["apply_sibling_linears_multi_lora"]


class _SiblingLinearsMultiLoRA(torch.autograd.Function):
    """Inputs: ``x, n, plans, weights, seeds, drops`` then the n plans' sink tokens; n outputs."""

    @staticmethod
    def forward(ctx, x, n: int, plans: tuple, weights: tuple, seeds: tuple, drops: tuple, *tokens):
        ctx.set_materialize_grads(False)  # an unused sibling's output: no zeros to read
        x = x if x.stride(1) == 1 else x.contiguous()
        with_g = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6:])
        ys, hs, gs = [], [], []
        for plan, w, seed, drop in zip(plans, weights, seeds, drops):
            y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
            h, g = _lora_forward(plan, x, y, seed, drop, plan.weights[0], accumulate=False, with_g=with_g)
            y.addmm_(x, w.t())
            ys.append(y)
            hs.append(h)
            gs.append(g)
        ctx.save_for_backward(x, *hs, *weights)
        ctx.plans, ctx.seeds, ctx.drops, ctx.gs, ctx.n = plans, seeds, drops, gs, n
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        x, *rest = ctx.saved_tensors
        hs, weights = rest[:n], rest[n:]
        gs, ctx.gs = ctx.gs, [None] * n  # a second backward (retain_graph) must not add into these
        need_x = ctx.needs_input_grad[0]
        dx: Optional[torch.Tensor] = None
        used = []
        for j in range(n):
            dy = dys[j]
            if dy is None:
                continue
            dy = dy.to(x.dtype)
            dy = dy if dy.stride(1) == 1 else dy.contiguous()
            plan = ctx.plans[j]
            # The first stores its LoRA dX (dx None), the next add theirs into it (ADD_DX).
            got, _, _, _ = _lora_backward(plan, x, hs[j], dy, plan.weights[0], ctx.seeds[j], ctx.drops[j],
                                          need_x, True, dx=dx, g=gs[j])
            if need_x:
                dx = got
            used.append((dy, weights[j]))
        if need_x:
            if dx is None:  # no sibling's output reached the loss
                dx = torch.zeros_like(x)
            for dy, w in used:
                dx.addmm_(dy, w)
        return (dx,) + (None,) * (5 + n)


_siblings_apply = function_apply(_SiblingLinearsMultiLoRA)


def apply_sibling_linears_multi_lora(plans: Sequence[MultiLoRAPlan], x: torch.Tensor, weights: Sequence[torch.Tensor],
                                     seeds: Sequence[int], streams: Optional[torch.Tensor] = None,
                                     width: Optional[int] = None) -> List[torch.Tensor]:
    """``[linear(x, W_j) + Σ_i scale_i · dropout_j(x_i) A_jiᵀ B_jiᵀ for each sibling j]`` as one
    autograd node: the same numbers as one ``apply_linear_multi_lora`` per sibling, but the input
    gradient is summed inside the node (no autograd adds between siblings). Frozen ``weights``
    without biases; each plan with a gradient sink covering every row of ``x``; ``seeds[j]``
    draws sibling j's dropout masks, ``streams``/``width`` as ``apply_linear_multi_lora``."""
    if not plans or len(plans) != len(weights) or len(plans) != len(seeds):
        raise ValueError(f"plans, weights and seeds must be non-empty and of one length, got "
                         f"{len(plans)}, {len(weights)}, {len(seeds)}")
    launch_seeds, drops = [], []
    for j, (plan, w) in enumerate(zip(plans, weights)):
        if not plan.grad_sink:
            raise ValueError(f"plans[{j}] has no gradient sink (prepare_multi_lora(grad_a=...))")
        if w.requires_grad:
            raise ValueError(f"weights[{j}] requires grad: the fused linear computes no gradient for it")
        if tuple(w.shape) != (plan.out_features, plan.in_features) or w.dtype != plan.dtype:
            raise ValueError(f"weights[{j}] must be [{plan.out_features}, {plan.in_features}] {plan.dtype}, "
                             f"got {tuple(w.shape)} {w.dtype}")
        plan.check_input(x)
        if plan.tokens == 0:
            raise ValueError(f"plans[{j}] covers no rows: use torch.nn.functional.linear")
        seed, drop = _seed_and_drop(plan, x, seeds[j], streams, width)
        launch_seeds.append(seed)
        drops.append(drop)
    return list(_siblings_apply(x, len(plans), tuple(plans), tuple(weights), tuple(launch_seeds), tuple(drops),
                                *(p.sink_token for p in plans)))
