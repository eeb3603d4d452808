"""alto_kernels: fused multi-LoRA for training (Triton) and its PyTorch reference.

Import as ``alto_kernels`` (the folder is ``kernels/alto_kernels/``: ``kernels`` is a PyPI package
transformers imports, so ``kernels/`` itself is no package). No Ray and no model code here.
``fused_multi_lora``, ``prepare_multi_lora``/``apply_multi_lora`` (cached plans, gradient sink) and
``dropout_mask`` (``alto_kernels.fused``), ``fused_linear_multi_lora`` (the frozen base linear and
the deltas as one node, gradients for every A_i, B_i) and ``apply_linear_multi_lora`` (the same
with a gradient sink; both ``alto_kernels.fused_linear``) import Triton on first use, as do the fused RMSNorm
``rms_norm`` (``alto_kernels.fused_rms_norm``; ``rms_norm_reference`` is its formula in PyTorch) and
the fused SwiGLU activation ``silu_mul`` (``alto_kernels.fused_silu_mul``; ``silu_mul_reference``), and
the fused rotary embedding ``rotary`` (``alto_kernels.fused_rotary``; ``rotary_reference``), and the
token cross-entropy that writes its gradient into the logits ``cross_entropy``
(``alto_kernels.fused_cross_entropy``; ``cross_entropy_reference``).
"""
from .dispatch import multi_lora, resolve_backend, triton_available
from .reference import (check_segments, cross_entropy_reference, multi_lora_reference, rms_norm_reference,
                        rotary_reference, silu_mul_reference)

__all__ = ["apply_linear_multi_lora", "apply_multi_lora", "check_segments", "cross_entropy",
           "cross_entropy_reference", "dropout_mask", "fused_linear_multi_lora",
           "fused_multi_lora", "multi_lora",
           "multi_lora_reference", "prepare_multi_lora", "resolve_backend", "rms_norm", "rms_norm_reference",
           "rotary", "rotary_reference", "silu_mul", "silu_mul_reference", "triton_available"]

_FUSED = ("fused_multi_lora", "dropout_mask", "prepare_multi_lora", "apply_multi_lora", "MultiLoRAPlan")


def __getattr__(name):
    if name in _FUSED:
        from . import fused
        return getattr(fused, name)
    if name in ("fused_linear_multi_lora", "apply_linear_multi_lora"):
        from . import fused_linear
        return getattr(fused_linear, name)
    if name == "rms_norm":
        from .fused_rms_norm import rms_norm
        return rms_norm
    if name in ("rotary", "check_rotary"):
        from . import fused_rotary
        return getattr(fused_rotary, name)
    if name == "cross_entropy":
        from .fused_cross_entropy import cross_entropy
        return cross_entropy
    if name == "silu_mul":
        from .fused_silu_mul import silu_mul
        return silu_mul
    raise AttributeError(f"module 'alto_kernels' has no attribute {name!r}")
