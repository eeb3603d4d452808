"""alto_kernels: fused multi-LoRA for training (Triton) and its PyTorch reference.

Import as ``alto_kernels`` (the folder is ``kernels/``). No Ray and no model code here.
"""
from .dispatch import multi_lora, resolve_backend, triton_available
from .reference import check_segments, multi_lora_reference

__all__ = ["check_segments", "multi_lora", "multi_lora_reference", "resolve_backend", "triton_available"]
