"""Fused SwiGLU activation ``silu(g) · u``: one pass forward, one pass backward.

In eager PyTorch a Llama MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` is a SiLU kernel and a
multiply forward, and two multiplies and a SiLU backward kernel backward, over ``[tokens,
intermediate]`` tensors (117 MB each at 4,096 tokens of an 8B model), and autograd keeps
``silu(g)`` alive for the backward. Here the forward reads ``g`` and ``u`` once and writes ``h``;
the backward reads ``dh``, ``g`` and ``u`` once and writes ``dg`` and ``du``; only ``g`` and ``u``
are kept.

Numerics follow eager bf16/fp16: ``silu(g)`` is computed in fp32 and rounded to the input dtype
before the product (as the separate SiLU kernel's output is), and in the backward
``dh · u`` is rounded before SiLU's derivative is applied. ``silu_mul_reference``
(``reference.py``) is the eager formula and the test oracle; ``silu_mul`` is the launcher
(shape and dtype checks) and the autograd Function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchKey, TunedLauncher, cfg, configs, dtype_name, function_apply, t_hint

SILU_CONFIGS = configs(full=[cfg(BLOCK=b, num_warps=w, num_stages=1) for b, w in ((1024, 4), (2048, 8), (4096, 8))],
                       interp=cfg(BLOCK=64, num_warps=4, num_stages=1))


# ``n`` changes with every batch's token count: not specialised on (a divisibility class of its
# own would compile the kernel again mid-run).
@triton.autotune(configs=SILU_CONFIGS, key=["T_HINT"])
@triton.jit(do_not_specialize=["n"])
def silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, n, T_HINT, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)  # the SiLU kernel's output
    tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=SILU_CONFIGS, key=["T_HINT"])
@triton.jit(do_not_specialize=["n"])
def silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, T_HINT, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = (g * sig).to(dg_ptr.dtype.element_ty).to(tl.float32)
    ds = (dh * u).to(dg_ptr.dtype.element_ty).to(tl.float32)       # grad of silu(g), rounded as eager
    tl.store(dg_ptr + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + offs, (dh * s).to(du_ptr.dtype.element_ty), mask=ok)


_FWD = TunedLauncher(silu_mul_fwd_kernel, "silu_mul_fwd")
_BWD = TunedLauncher(silu_mul_bwd_kernel, "silu_mul_bwd")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KEYS: dict = {}


def _key(dtype: torch.dtype, n: int) -> LaunchKey:
    memo = (dtype, n)
    key = _KEYS.get(memo)
    if key is None:
        if len(_KEYS) > 4096:
            _KEYS.clear()
        key = _KEYS[memo] = LaunchKey((dtype_name(dtype),), (), 1, 1, t_hint(n))
    return key


def _grid(n: int):
    return lambda m: (triton.cdiv(n, m["BLOCK"]),)


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            key = _key(g.dtype, n)
            _FWD(_grid(n), key, g, u, h, n, key.t_hint, device_index=g.device.index or 0)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            key = _key(g.dtype, n)
            _BWD(_grid(n), key, dh, g, u, dg, du, n, key.t_hint, device_index=g.device.index or 0)
        return dg, du


_apply_silu_mul = function_apply(_SiLUMul)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) · u`` elementwise; differentiable in both. Same shape, dtype and device required."""
    if not isinstance(g, torch.Tensor) or not isinstance(u, torch.Tensor):
        raise ValueError("g and u must be tensors")
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"g {tuple(g.shape)} {g.dtype} {g.device} and u {tuple(u.shape)} {u.dtype} {u.device} "
                         "must match in shape, dtype and device")
    if g.dtype not in DTYPES:
        raise ValueError(f"dtype {g.dtype}: expected one of {DTYPES}")
    return _apply_silu_mul(g.contiguous(), u.contiguous())
