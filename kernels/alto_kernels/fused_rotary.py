"""Fused rotary position embedding ``x·cos + rotate_half(x)·sin`` for q and k, one pass each way.

Hugging Face's ``apply_rotary_pos_emb`` is, per tensor, two slices, a negation, a cat, two
broadcast multiplies and an add forward, and as many again backward: about 20 kernels per layer
per step over ``[tokens, heads, head_dim]`` (7% of a Llama-8B grouped step on an H100). Here
each of q and k is read once and written once each way; ``cos``/``sin`` (``[B or 1, L, D]``,
shared by all heads) are re-read per head from L2.

Numerics are eager's, bit for bit in bf16/fp16: each product is rounded to the input dtype
before the sum, as the separate multiply kernels' outputs are, and the kernel is compiled with
``enable_fp_fusion=False`` (with contraction a product feeds an FMA unrounded: 20% of the
elements of an 8B-shaped q differed by an ulp on the H100). The backward is the transpose of the same map::

    y1 = x1·c1 − x2·s1        dx1 = dy1·c1 + dy2·s2
    y2 = x2·c2 + x1·s2        dx2 = dy2·c2 − dy1·s1

``rotary_reference`` (``reference.py``) is the eager formula and the test oracle; ``rotary`` is
the launcher (shape, dtype and layout checks) and the autograd Function. Tensors are taken with
their own strides (q and k arrive as transposed views of the projections' outputs); outputs
have the layout of their inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LaunchKey, TunedLauncher, cfg, configs, dtype_name, function_apply, t_hint

ROTARY_CONFIGS = configs(full=[cfg(BLOCK_L=bl, HEADS=h, num_warps=w, num_stages=1)
                               for bl, h, w in ((16, 4, 4), (32, 4, 4), (32, 8, 8), (64, 2, 4), (64, 4, 8))],
                         interp=cfg(BLOCK_L=8, HEADS=2, num_warps=4, num_stages=1))


# The sequence length changes with every batch's padding: not specialised on (each of its
# divisibility classes would compile the kernel again, seconds each, mid-run).
@triton.autotune(configs=ROTARY_CONFIGS, key=["H", "HALF", "T_HINT"])
@triton.jit(do_not_specialize=["L"])
def rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, L, HALF, sxb, sxh, sxl, syb, syh, syl, scb, scl, ssb, ssl,
                  T_HINT, BACKWARD: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_L: tl.constexpr,
                  HEADS: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    h0 = tl.program_id(2) * HEADS
    dt = y_ptr.dtype.element_ty
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_HALF)
    ok = (rows < L)[:, None] & (cols < HALF)[None, :]
    rows64 = rows.to(tl.int64)
    b64 = b.to(tl.int64)
    c_at = cos_ptr + b64 * scb + rows64[:, None] * scl + cols[None, :]
    s_at = sin_ptr + b64 * ssb + rows64[:, None] * ssl + cols[None, :]
    c1 = tl.load(c_at, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_at + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_at, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_at + HALF, mask=ok, other=0.0).to(tl.float32)
    for i in range(HEADS):
        h = h0 + i
        hm = ok & (tl.full((BLOCK_L,), 0, tl.int32) + h < H)[:, None]
        x_at = x_ptr + b64 * sxb + h.to(tl.int64) * sxh + rows64[:, None] * sxl + cols[None, :]
        y_at = y_ptr + b64 * syb + h.to(tl.int64) * syh + rows64[:, None] * syl + cols[None, :]
        x1 = tl.load(x_at, mask=hm, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=hm, other=0.0).to(tl.float32)
        # Each product rounded to the tensor dtype before the sum, as eager's separate kernels.
        p11 = (x1 * c1).to(dt).to(tl.float32)
        p22 = (x2 * c2).to(dt).to(tl.float32)
        if BACKWARD:
            y1 = p11 + (x2 * s2).to(dt).to(tl.float32)
            y2 = p22 - (x1 * s1).to(dt).to(tl.float32)
        else:
            y1 = p11 - (x2 * s1).to(dt).to(tl.float32)
            y2 = p22 + (x1 * s2).to(dt).to(tl.float32)
        tl.store(y_at, y1.to(dt), mask=hm)
        tl.store(y_at + HALF, y2.to(dt), mask=hm)


_LAUNCH = TunedLauncher(rotary_kernel, "rotary")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 1024
_KEYS: dict = {}


def _key(dtype: torch.dtype, heads: int, half: int, tokens: int, backward: bool) -> LaunchKey:
    memo = (dtype, heads, half, tokens, backward)
    key = _KEYS.get(memo)
    if key is None:
        if len(_KEYS) > 4096:  # token counts vary with the batch layout: keep the memo bounded
            _KEYS.clear()
        key = _KEYS[memo] = LaunchKey((dtype_name(dtype),), (backward,), int(heads), int(half), t_hint(tokens))
    return key


def _bhld(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """``t`` as a ``[B, H, L, D]`` view (no copy)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)  # same layout as x (a dense transposed view stays transposed)
    xv, yv = _bhld(x, unsqueeze_dim), _bhld(y, unsqueeze_dim)
    B, H, L, D = xv.shape
    if xv.numel() == 0:
        return y
    half = D // 2
    key = _key(x.dtype, H, half, B * L, backward)
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    _LAUNCH(lambda m: (triton.cdiv(L, m["BLOCK_L"]), B, triton.cdiv(H, m["HEADS"])), key,
            xv, cos, sin, yv, H, L, half, xv.stride(0), xv.stride(1), xv.stride(2),
            yv.stride(0), yv.stride(1), yv.stride(2), cb, cos.stride(1), sb, sin.stride(1), key.t_hint,
            BACKWARD=backward, BLOCK_HALF=triton.next_power_of_2(half), enable_fp_fusion=False,
            device_index=x.device.index or 0)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _rotate(q, cos, sin, unsqueeze_dim, False), _rotate(k, cos, sin, unsqueeze_dim, False)

    @staticmethod
    def backward(ctx, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor]):
        cos, sin = ctx.saved_tensors
        u = ctx.unsqueeze_dim
        return (_rotate(dq, cos, sin, u, True) if dq is not None else None,
                _rotate(dk, cos, sin, u, True) if dk is not None else None, None, None, None)


_apply_rotary = function_apply(_Rotary)


def check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> Optional[str]:
    """Why ``rotary`` cannot take these arguments, or None. The caller of a model's own rotary
    function falls back to it where this is not None."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return "q, k, cos and sin must be tensors"
    if unsqueeze_dim not in (1, 2):
        return f"unsqueeze_dim {unsqueeze_dim}: 1 (q [B, H, L, D]) or 2 (q [B, L, H, D])"
    if q.dim() != 4 or k.dim() != 4:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D"
    qv, kv = _bhld(q, unsqueeze_dim), _bhld(k, unsqueeze_dim)
    B, _, L, D = qv.shape
    if kv.shape[0] != B or kv.shape[2] != L or kv.shape[3] != D:
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)} outside the head axis"
    if D % 2 or not 0 < D <= MAX_HEAD_DIM:
        return f"head_dim {D}: an even number up to {MAX_HEAD_DIM}"
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (L, D) or cos.shape[0] not in (1, B):
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [{B} or 1, {L}, {D}]"
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return "cos and sin need a contiguous last dimension"
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 or q.dtype not in DTYPES:
        return f"q, k, cos, sin dtypes {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}: one of {DTYPES} for all"
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return "q, k, cos and sin must be on one device"
    if cos.requires_grad or sin.requires_grad:
        return "cos or sin requires grad: the fused rotary computes no gradient for them"
    return None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1, checked: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` with ``cos``/``sin``
    broadcast over heads (``apply_rotary_pos_emb``'s contract); differentiable in q and k.
    ``ValueError`` for arguments the kernel does not take (see ``check_rotary``; ``checked``:
    the caller has just asked it)."""
    why = None if checked else check_rotary(q, k, cos, sin, unsqueeze_dim)
    if why is not None:
        raise ValueError(why)
    return _apply_rotary(q, k, cos, sin, unsqueeze_dim)
