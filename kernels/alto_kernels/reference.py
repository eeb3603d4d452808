"""Plain PyTorch multi-LoRA: the test oracle for the Triton kernels and the CPU path.

Tokens of all adapters are concatenated as ``x [T, in]`` in segments, one per adapter:
adapter ``i`` owns rows ``seg_offsets[i]:seg_offsets[i+1]``. Its weights are
``A_i [r_i, in]`` and ``B_i [out, r_i]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight``
layout) and its contribution is ``scale_i * dropout(x_i) @ A_iᵀ @ B_iᵀ``.
Autograd gives ``dX``, ``dA_i`` and ``dB_i``; a loop over segments is slow on a GPU
(one launch pair per adapter) but obviously right, which is what an oracle must be.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def check_segments(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                   seg_offsets: Sequence[int], scales: Sequence[float]) -> None:
    """Shape checks shared by every backend; a wrong segment table would silently mix adapters."""
    n = len(lora_a)
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, in_features], got shape {tuple(x.shape)}")
    if len(lora_b) != n or len(scales) != n:
        raise ValueError(f"lora_a, lora_b and scales must have one entry per adapter ({n}); "
                         f"got {len(lora_b)} B and {len(scales)} scales")
    if len(seg_offsets) != n + 1:
        raise ValueError(f"seg_offsets must have len(adapters)+1 = {n + 1} entries, got {len(seg_offsets)}")
    offs = [int(o) for o in seg_offsets]
    if offs[0] != 0 or offs[-1] != x.shape[0] or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"seg_offsets must rise from 0 to {x.shape[0]}, got {offs}")
    out = lora_b[0].shape[0] if n else None
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"adapter {i}: A and B must be 2-D")
        r = a.shape[0]
        if r <= 0:
            raise ValueError(f"adapter {i}: rank must be > 0, got {r}")
        if a.shape[1] != x.shape[1]:
            raise ValueError(f"adapter {i}: A is [{r}, {a.shape[1]}] but x has {x.shape[1]} features")
        if b.shape[1] != r or b.shape[0] != out:
            raise ValueError(f"adapter {i}: B must be [{out}, {r}], got {tuple(b.shape)}")


def multi_lora_reference(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                         seg_offsets: Sequence[int], scales: Sequence[float],
                         dropout_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                         dropout_p: Optional[Sequence[float]] = None,
                         training: bool = False) -> torch.Tensor:
    """The LoRA delta ``[T, out]`` (not yet added to the base output).

    Dropout: pass ``dropout_masks`` (one ``[T_i, in]`` 0/1 tensor or None per adapter, already
    scaled or not — they are multiplied in as given, then divided by ``1-p``) to reproduce a
    kernel's mask exactly; or pass ``dropout_p`` with ``training=True`` to draw masks from
    torch's RNG, as PEFT does.
    """
    check_segments(x, lora_a, lora_b, seg_offsets, scales)
    out_features = lora_b[0].shape[0] if len(lora_b) else 0
    pieces = []
    offs = [int(o) for o in seg_offsets]
    for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scales)):
        xi = x[offs[i]:offs[i + 1]]
        if xi.shape[0] == 0:
            continue
        p = float(dropout_p[i]) if dropout_p is not None else 0.0
        if dropout_masks is not None and dropout_masks[i] is not None:
            xi = xi * dropout_masks[i].to(xi.dtype) / (1.0 - p)
        elif training and p > 0.0:
            xi = F.dropout(xi, p=p, training=True)
        pieces.append((offs[i], offs[i + 1], (xi @ a.t().to(xi.dtype)) @ b.t().to(xi.dtype) * s))
    if not pieces:
        return x.new_zeros(x.shape[0], out_features)
    # Concatenate instead of index_add so the graph stays simple and every row is written once.
    chunks = []
    cursor = 0
    for lo, hi, y in pieces:
        if lo > cursor:
            chunks.append(x.new_zeros(lo - cursor, out_features))
        chunks.append(y)
        cursor = hi
    if cursor < x.shape[0]:
        chunks.append(x.new_zeros(x.shape[0] - cursor, out_features))
    return torch.cat(chunks, dim=0)


def stream_dropout_masks(seed: int, seg_offsets: Sequence[int], dropout_p: Sequence[float], in_features: int,
                         streams: Sequence[int], width: Optional[int] = None,
                         seq_strides: Optional[Sequence[int]] = None, device=None) -> list:
    """Keep-masks for the reference path that depend only on each adapter's own stream (and
    ``seed``), like the kernels' with a stream table: adapter i's bits come from a generator seeded
    by its stream, and with ``width`` rows per packed sequence, row t of sequence j reads element
    ``[j, t]`` of a ``[n_seq, stride_i, in]`` draw, so the width others set changes nothing (rows
    past the adapter's stride are its padding and keep everything). Not the kernels' bits."""
    offs = [int(o) for o in seg_offsets]
    masks = []
    for i in range(len(offs) - 1):
        rows, p = offs[i + 1] - offs[i], float(dropout_p[i])
        if rows == 0 or p <= 0.0:
            masks.append(None)
            continue
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(streams[i])) % 2 ** 62)
        stride = int(seq_strides[i]) if seq_strides is not None else 0
        if width and stride:
            n_seq = rows // int(width)
            keep = torch.rand(n_seq, stride, in_features, generator=gen) >= p
            w = int(width)
            if w <= stride:
                keep = keep[:, :w]
            else:
                keep = torch.cat([keep, keep.new_ones(n_seq, w - stride, in_features)], dim=1)
            keep = keep.reshape(rows, in_features)
        else:
            keep = torch.rand(rows, in_features, generator=gen) >= p
        masks.append(keep.to(device) if device is not None else keep)
    return masks


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's ``LlamaRMSNorm`` formula, op for op (the CPU path and the test oracle of
    ``rms_norm``): fp32 statistics, ``x_hat`` rounded to the input dtype, then the weight."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A Llama MLP's ``act_fn(gate) * up`` in eager PyTorch (the oracle of ``silu_mul``)."""
    return F.silu(g) * u


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy in fp32, as the trainer computed it before ``cross_entropy``
    (its oracle): ``F.cross_entropy(logits.float(), targets, reduction="none")``."""
    return F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore_index)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1):
    """Hugging Face's ``apply_rotary_pos_emb`` in eager PyTorch (the oracle of ``rotary``)."""
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
