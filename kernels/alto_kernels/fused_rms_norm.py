"""Fused RMSNorm for a frozen backbone: one pass forward, one pass backward (dX only).

Hugging Face's eager ``LlamaRMSNorm`` is six to eight elementwise kernels each way, in fp32 over
the whole ``[tokens, hidden]`` activation: on the H100 the norms of a Llama-8B step were ~40 of
its ~96 ms of elementwise time (``benchmarks/engine_profile.py``), paid per token by every
adapter of the group. Here each program owns one row: it reads the row once, keeps it in
registers, and writes the output (and its ``rstd``, 4 bytes a row) once; the backward reads
``x``, ``dy`` and writes ``dx`` once. The weight is frozen, so no ``dW`` is computed (a weight
that requires grad is refused: the caller keeps the eager module then).

Numerics follow the eager module: ``x_hat = x · rsqrt(mean(x²) + eps)`` in fp32, rounded to the
input dtype, then multiplied by the weight in the promoted dtype of (weight, input).
``rms_norm_reference`` (``reference.py``) is the formula itself and the test oracle; ``rms_norm`` is
the launcher (shape, dtype and frozen-weight checks) and the autograd Function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchKey, TunedLauncher, cfg, configs, dtype_name, function_apply, t_hint

RMS_CONFIGS = configs(full=[cfg(num_warps=w, num_stages=1) for w in (4, 8, 16)],
                      interp=cfg(num_warps=4, num_stages=1))


@triton.autotune(configs=RMS_CONFIGS, key=["N", "T_HINT"])
@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, stride_x, stride_y, T_HINT, eps,
                        BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    x_hat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager module rounds here
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.autotune(configs=RMS_CONFIGS, key=["N", "T_HINT"])
@triton.jit
def rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, N, stride_x, stride_dy, stride_dx, T_HINT,
                        BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    x_hat = x * rstd
    g = dy * w                                   # d x_hat
    dx = (g - x_hat * (tl.sum(g * x_hat, axis=0) / N)) * rstd
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)


_FWD = TunedLauncher(rms_norm_fwd_kernel, "rms_norm_fwd")
_BWD = TunedLauncher(rms_norm_bwd_kernel, "rms_norm_bwd")
MAX_HIDDEN = 65536  # one row per program, held in registers
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_KEYS: dict = {}


def _key(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, block: int) -> LaunchKey:
    """The launch key, memoised: a norm runs twice per layer per step on the host-bound path."""
    T, N = x.shape
    memo = (x.dtype, w.dtype, out_dtype, N, T)
    key = _KEYS.get(memo)
    if key is None:
        if len(_KEYS) > 4096:  # token counts vary with the batch layout: keep the memo bounded
            _KEYS.clear()
        key = _KEYS[memo] = LaunchKey((dtype_name(x.dtype), dtype_name(w.dtype), dtype_name(out_dtype),
                                       f"block{block}"), (), int(N), 1, t_hint(int(T)))
    return key


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        T, N = x2d.shape
        out_dtype = torch.promote_types(weight.dtype, x2d.dtype)
        y = torch.empty((T, N), device=x2d.device, dtype=out_dtype)
        rstd = torch.empty(T, device=x2d.device, dtype=torch.float32)
        block = triton.next_power_of_2(N)
        if T:
            key = _key(x2d, weight, out_dtype, block)
            _FWD((T,), key, x2d, weight, y, rstd, N, x2d.stride(0), y.stride(0), key.t_hint, float(eps),
                 BLOCK_N=block, device_index=x2d.device.index or 0)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.block = block
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        T, N = x2d.shape
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        dx = torch.empty_like(x2d)
        if T:
            key = _key(x2d, weight, dy.dtype, ctx.block)
            _BWD((T,), key, x2d, weight, dy, rstd, dx, N, x2d.stride(0), dy.stride(0), dx.stride(0), key.t_hint,
                 BLOCK_N=ctx.block, device_index=x2d.device.index or 0)
        return dx, None, None


_apply_rms_norm = function_apply(_RMSNorm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · round(x · rsqrt(mean(x², -1) + eps))`` over the last dim; differentiable in ``x``.

    ``weight`` must be frozen (no ``dW``): ``ValueError`` otherwise, as for a shape or dtype the
    kernels do not take.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with a feature dimension")
    N = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(f"weight must be [{N}], got {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad: the fused RMSNorm computes no weight gradient")
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must be one of {DTYPES}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    if not 0 < N <= MAX_HIDDEN:
        raise ValueError(f"hidden size {N}: the fused RMSNorm takes 1..{MAX_HIDDEN}")
    x2d = x.reshape(-1, N)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    return _apply_rms_norm(x2d, weight, float(eps)).view(*x.shape[:-1], N)
