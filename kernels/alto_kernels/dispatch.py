"""Backend choice for multi-LoRA: the fused Triton kernel on a GPU, the reference elsewhere."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .reference import multi_lora_reference, stream_dropout_masks


def triton_available() -> bool:
    try:
        from . import fused  # noqa: F401  (imports triton)
    except Exception:  # triton missing or broken: the reference still works
        return False
    return True


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend != "auto":
        return backend
    if (x.is_cuda or os.environ.get("ALTO_TRITON") == "1") and triton_available():
        return "triton"
    return "reference"


def multi_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: Sequence[torch.Tensor],
               lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
               dropout_p: Optional[Sequence[float]] = None, training: bool = False, seed: int = 0,
               backend: str = "auto", streams: Optional[Sequence[int]] = None, width: Optional[int] = None,
               seq_strides: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``base_out + Σ_i scale_i · dropout(x_i) A_iᵀ B_iᵀ`` over segments; differentiable.

    ``streams`` (one number per adapter), ``width`` (rows per packed sequence) and
    ``seq_strides`` make each adapter's dropout masks its own: independent of its position and
    of the other adapters' rows (on either backend; the two draw different bits).
    """
    if resolve_backend(x, backend) == "triton":
        from .fused import fused_multi_lora
        return fused_multi_lora(x, base_out, lora_a, lora_b, seg_offsets, scales,
                                dropout_p=dropout_p, training=training, seed=seed, streams=streams,
                                width=width, seq_strides=seq_strides)
    masks = None
    if training and dropout_p is not None and streams is not None:
        masks = stream_dropout_masks(seed, seg_offsets, dropout_p, x.shape[1], streams, width, seq_strides,
                                     device=x.device)
    return base_out + multi_lora_reference(x, lora_a, lora_b, seg_offsets, scales, dropout_masks=masks,
                                           dropout_p=dropout_p, training=training)
