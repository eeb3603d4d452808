"""Token cross-entropy over a large vocabulary with its gradient written into the logits.

The loss of a grouped step is ``cross_entropy(logits.float(), targets, reduction="none")`` over
every labelled token of every adapter: with Llama-3's 128k vocabulary and 4096 tokens that is a
1 GB bf16 logits tensor, its 2 GB fp32 upcast, a 2 GB ``log_softmax`` kept for the backward and
a 2 GB fp32 gradient cast back to bf16, about 14 GB of memory traffic and 5 GB of peak memory
that scale with the group's tokens. Here one program owns one row: a first pass over the row
keeps a running max and sum of exponentials in fp32 (the log-sum-exp), the loss is
``lse - logit[target]``, and, when the logits need a gradient, a second pass writes
``softmax - onehot(target)`` over the row *in place*, in the logits' dtype. The backward only
scales each row by its incoming gradient. Peak memory is the logits tensor itself, and the
traffic three reads and two writes of it (Liger-Kernel's cross-entropy does the same).

The logits' storage is overwritten, so the autograd Function marks them dirty: anything that
saved them for its own backward fails autograd's version check instead of reading the gradient.
A graph built through it can be backpropagated once (a second backward would scale twice).
Targets equal to ``ignore_index`` give a zero loss and gradient; a target outside
``[0, vocab)`` gives a NaN loss (and a NaN gradient row), which the trainer reports per adapter,
rather than a device-side assert that would take the whole group down.
``cross_entropy_reference`` (``reference.py``) is the formula in PyTorch and the test oracle.
The trainer uses it wherever its LoRA kernels run (``ALTO_FUSED_CE=0`` turns it off). On an H100
(``benchmarks/ce_lean.sh``) the head GEMM + loss at 4096 x 128256 took 15.0 ms against 19.8 ms
for ``F.cross_entropy`` over an fp32 upcast, and 1.96 GiB above its inputs against 6.85 GiB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchKey, TunedLauncher, cfg, configs, dtype_name, function_apply, t_hint

CE_CONFIGS = configs(full=[cfg(BLOCK_V=bv, num_warps=w, num_stages=1)
                           for bv, w in ((2048, 4), (4096, 8), (8192, 8), (8192, 16))],
                     interp=cfg(BLOCK_V=64, num_warps=4, num_stages=1))


# ``restore_value``: with GRAD the kernel overwrites its input, so the autotuner's repeated
# timing runs must each start from the logits, and the real launch after them too.
@triton.autotune(configs=CE_CONFIGS, key=["V", "T_HINT", "GRAD"], restore_value=["logits_ptr"])
@triton.jit
def cross_entropy_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride, T_HINT, ignore_index,
                             GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < V)
    x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(valid, lse - x_t, float("nan")))
    tl.store(loss_ptr + row, loss)
    if GRAD:
        # The row's gradient, d loss / d logit = softmax - onehot(target), over the logits.
        scale = tl.where(ignored, 0.0, tl.where(valid, 1.0, float("nan")))
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + cols
            ok = idx < V
            x = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)) * scale
            tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=ok)


_FWD = TunedLauncher(cross_entropy_fwd_kernel, "cross_entropy_fwd")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _key(logits: torch.Tensor, grad: bool) -> LaunchKey:
    T, V = logits.shape
    return LaunchKey((dtype_name(logits.dtype),), (grad,), int(V), 1, t_hint(int(T)))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        T, V = logits.shape
        grad = ctx.needs_input_grad[0]
        loss = torch.empty(T, device=logits.device, dtype=torch.float32)
        if T:
            key = _key(logits, grad)
            _FWD((T,), key, logits, targets, loss, V, logits.stride(0), key.t_hint, int(ignore_index),
                 GRAD=grad, device_index=logits.device.index or 0)
        if grad:
            ctx.mark_dirty(logits)  # it holds the gradient now
            ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(logits)
        ctx.used = False
        return loss, logits

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor, _d_logits):
        if ctx.used:
            raise RuntimeError("cross_entropy's gradient lives in the logits and was already scaled by "
                               "a backward: backpropagate through it once (no retain_graph re-use)")
        ctx.used = True
        (g,) = ctx.saved_tensors
        if d_loss is None:
            return None, None, None
        return g.mul_(d_loss.unsqueeze(1)), None, None


_apply_ce = function_apply(_CrossEntropy)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``cross_entropy(logits.float(), targets, reduction="none")`` (fp32), from
    ``[T, V]`` logits and ``[T]`` integer targets.

    When ``logits`` need a gradient their storage is overwritten with it (see the module doc): do
    not read them after this call. ``ValueError`` for a shape, dtype or device the kernel does
    not take.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a [tokens, vocab] tensor")
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits must be one of {DTYPES}, got {logits.dtype}")
    if (not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != logits.shape[0]
            or targets.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"targets must be an int32/int64 [{logits.shape[0]}] tensor, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device}, logits on {logits.device}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if logits.requires_grad and logits.is_leaf:
        logits = logits.clone()  # a leaf cannot be overwritten in place
    return _apply_ce(logits, targets.contiguous(), int(ignore_index))[0]
