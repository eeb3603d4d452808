"""Sibling frozen linears of one input (q/k/v, gate/up) and their multi-LoRA deltas as ONE node.

Each of ``apply_linear_multi_lora``'s nodes returns its own input gradient, and autograd sums the
siblings' with an add kernel each (over [tokens, in] in bf16: on the Llama-8B step, 96 of its 221
add kernels, ~3 ms). Here the siblings share one backward: after each sibling's dY pass, ONE
``lora_bwd_dx_siblings`` launch reads X once, stores the sum of the siblings' LoRA dX and adds
every sibling's dA into its sink; the base GEMMs then add ``dY_j W_j`` into that dX in their
epilogue (``addmm_``, beta 1). With ``ALTO_SIBLING_DX_PASS=0``, and where that pass cannot run
(siblings whose chunk tables or padded ranks differ, more than three, a kernel config only
autotuning could give), the first sibling's ``lora_bwd_dx`` stores its LoRA dX and the next ones add
theirs into it (``ADD_DX``). The forward
is each sibling's as in ``apply_linear_multi_lora`` (``LINEAR_EPILOGUE``: no bias).

    >>> q, k, v = apply_sibling_linears_multi_lora([plan_q, plan_k, plan_v], x, [Wq, Wk, Wv], [s_q, s_k, s_v])

The plans need gradient sinks (the engine's) and rows that cover all of ``x``; an output no one
uses gets no gradient (its sibling's work is skipped in the backward).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

import triton

from ._common import TunedLauncher, function_apply
from .fused import _BWD_DX, _BWD_DY, _dot_prec, _key, _lora_backward, _lora_forward, _seed_and_drop
from .lora_bwd_dx_siblings import lora_bwd_dx_siblings_kernel
from .plan import MultiLoRAPlan

__all__ = ["apply_sibling_linears_multi_lora"]


# Never autotuned: every launch takes the config ``lora_bwd_dx`` has for the first sibling's key
# (autotuning would add into the gradient sinks once per config tried).
_BWD_DX_SIB = TunedLauncher(triton.autotune(configs=[triton.Config({"BLOCK_M": 32, "BLOCK_K": 128})], key=["K", "R"])(
    lora_bwd_dx_siblings_kernel), "lora_bwd_dx_siblings")
MAX_SIBLINGS = 3


def _shared_table(plans: Sequence[MultiLoRAPlan]) -> Optional[torch.Tensor]:
    """The siblings' pointer tables stacked (``[n, adapters, cols]``), or None where their chunk
    tables differ (one ``lora_bwd_dx_siblings`` launch needs one); cached on the first plan."""
    if len(plans) > MAX_SIBLINGS:
        return None
    cache = plans[0].derived.setdefault("siblings", {})
    key = tuple(id(p) for p in plans)
    got = cache.get(key)
    if got is not None and all(a is b for a, b in zip(got[0], plans)):
        return got[1]
    p0 = plans[0]
    same = all(p.R == p0.R and p.chunk == p0.chunk and p.has_dropout == p0.has_dropout and p.offsets == p0.offsets
               and tuple(p.ptrs.shape) == tuple(p0.ptrs.shape) and torch.equal(p.table, p0.table) for p in plans[1:])
    table = torch.stack([p.ptrs for p in plans]).contiguous() if same else None
    cache[key] = (tuple(plans), table)
    return table


def _one_pass_backward(plans, x, hs, g, dys, seeds, drops, need_x: bool) -> Optional[tuple]:
    """The siblings' LoRA backward with one dX pass: ``(dx or None,)``, or None where it cannot
    run (then nothing was launched)."""
    table = _shared_table(plans)
    if table is None:
        return None
    p0, n = plans[0], len(plans)
    T, K = x.shape
    dt, prec, dev = x.dtype, _dot_prec(x.dtype), x.device.index or 0
    w_ref = p0.weights[0]
    dy_keys = [_key(dt, w_ref.dtype, prec, p, dy.shape[1], True, exact=(f"chunk{p.chunk}",))
               for p, dy in zip(plans, dys) if dy is not None]
    dx_key = _key(dt, w_ref.dtype, prec, p0, K, p0.has_dropout, need_x, True, True)
    base = _BWD_DX.choice(dx_key, dev)
    if base is None or any(_BWD_DY.choice(k, dev) is None for k in dy_keys):
        return None
    for j, (p, dy) in enumerate(zip(plans, dys)):
        if dy is None:  # its G stays zero (the forward filled it): no dX, no dA from it
            continue
        N = dy.shape[1]
        _BWD_DY(lambda m: (p.table.shape[0], m["SPLIT_N"]), _key(dt, w_ref.dtype, prec, p, N, True,
                                                                exact=(f"chunk{p.chunk}",)),
                dy, hs[j], g[j], g[j], p.table, p.ptrs, w_ref, N, dy.stride(0), p.t_hint, R=p.R,
                ALIGN=p.table_align, DOT_PREC=prec, GRAD_SINK=True, BLOCK_M=p.chunk, device_index=dev)
    sib_key = _key(dt, w_ref.dtype, prec, p0, K, p0.has_dropout, need_x, exact=(f"siblings{n}",))
    if not _BWD_DX_SIB.is_tuned(sib_key):
        _BWD_DX_SIB.best[sib_key] = triton.Config({k: base.kwargs[k] for k in ("BLOCK_M", "BLOCK_K")},
                                                  num_warps=base.num_warps, num_stages=base.num_stages)
    dx = torch.empty_like(x) if need_x else None
    s = [int(v) for v in seeds] + [0] * (MAX_SIBLINGS - n)
    streams, width = drops[0]
    _BWD_DX_SIB(lambda m: (p0.table.shape[0], triton.cdiv(K, m["BLOCK_K"])), sib_key,
                x, g, dx if need_x else x, p0.table, table, w_ref, K, x.stride(0), (dx if need_x else x).stride(0),
                T * p0.R, table.shape[1] * table.shape[2], *s, streams, width, R=p0.R, ALIGN=p0.table_align,
                HAS_DROPOUT=p0.has_dropout, COMPUTE_DX=need_x, DOT_PREC=prec, NSIB=n, device_index=dev)
    return (dx,)


class _SiblingLinearsMultiLoRA(torch.autograd.Function):
    """Inputs: ``x, n, plans, weights, seeds, drops`` then the n plans' sink tokens; n outputs."""

    @staticmethod
    def forward(ctx, x, n: int, plans: tuple, weights: tuple, seeds: tuple, drops: tuple, *tokens):
        ctx.set_materialize_grads(False)  # an unused sibling's output: no zeros to read
        x = x if x.stride(1) == 1 else x.contiguous()
        with_g = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6:])
        # One [n, T, R] G for the one-pass backward (each sibling's expand zero-fills its slice)
        stacked = (torch.empty(n, x.shape[0], plans[0].R, device=x.device, dtype=torch.float32)
                   if with_g and ONE_PASS and _shared_table(plans) is not None else None)
        ys, hs, gs = [], [], []
        for j, (plan, w, seed, drop) in enumerate(zip(plans, weights, seeds, drops)):
            y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
            h, g = _lora_forward(plan, x, y, seed, drop, plan.weights[0], accumulate=False, with_g=with_g,
                                 g_out=None if stacked is None else stacked[j])
            y.addmm_(x, w.t())
            ys.append(y)
            hs.append(h)
            gs.append(g)
        ctx.save_for_backward(x, *hs, *weights)
        ctx.plans, ctx.seeds, ctx.drops, ctx.gs, ctx.n, ctx.stacked = plans, seeds, drops, gs, n, stacked
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        x, *rest = ctx.saved_tensors
        hs, weights = rest[:n], rest[n:]
        gs, ctx.gs = ctx.gs, [None] * n  # a second backward (retain_graph) must not add into these
        stacked, ctx.stacked = ctx.stacked, None
        need_x = ctx.needs_input_grad[0]
        dys = [None if dy is None else (dy.to(x.dtype) if dy.stride(1) == 1 else dy.to(x.dtype).contiguous())
               for dy in dys]
        done = None
        if stacked is not None and any(dy is not None for dy in dys):
            done = _one_pass_backward(ctx.plans, x, hs, stacked, dys, ctx.seeds, ctx.drops, need_x)
        if done is not None:
            dx = done[0]
            if need_x:
                for dy, w in zip(dys, weights):
                    if dy is not None:
                        dx.addmm_(dy, w)
            return (dx,) + (None,) * (5 + n)
        dx: Optional[torch.Tensor] = None
        used = []
        for j in range(n):
            dy = dys[j]
            if dy is None:
                continue
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

# The one-pass dX of the siblings (``lora_bwd_dx_siblings``) by default: on an H200 it matched a
# ``lora_bwd_dx`` each and took 0.9-1.3 ms less dX time per Llama-8B step (BENCHMARKS.md, Engine).
# ALTO_SIBLING_DX_PASS=0 gives a ``lora_bwd_dx`` each, adding into the first's dX.
ONE_PASS = os.environ.get("ALTO_SIBLING_DX_PASS", "1").strip().lower() in ("1", "true", "yes", "on")


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
