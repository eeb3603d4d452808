"""The backbone's RMSNorms through the fused kernel (``alto_kernels.rms_norm``) on GPUs.

Eager RMSNorm is six to eight elementwise kernels each way in fp32 over every token of the
group; on an H100 they were ~40 ms of a 341 ms Llama-8B step. ``FusedRMSNorm`` takes a norm's
place holding the *same* ``weight`` Parameter under the same name, so state-dict keys, PEFT
export and loading are unchanged. A module is replaced only if its own forward gives exactly
``rms_norm_reference`` on a probe input: a variant with another formula (Gemma's ``1 + weight``,
a norm without the intermediate rounding) keeps its own module. ``ALTO_FUSED_NORM=0`` turns the
replacement off.
"""
from __future__ import annotations

import os

import alto_kernels
import torch
from torch import nn

from .lora import LoRARuntime


class FusedRMSNorm(nn.Module):
    """A frozen RMSNorm: the fused kernel where the model's kernels run, the same formula elsewhere."""

    def __init__(self, weight: nn.Parameter, eps: float, runtime: LoRARuntime, replaces: str) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        self.runtime = runtime
        self.replaces = replaces  # the original class, for repr and debugging

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (hidden_states.is_cuda and not w.requires_grad and type(w.data) is torch.Tensor
                and self.runtime.uses_triton(hidden_states.device)):
            return alto_kernels.rms_norm(hidden_states, w, self.variance_epsilon)
        return alto_kernels.rms_norm_reference(hidden_states, w, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, replaces={self.replaces}"


def _eps(module: nn.Module):
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def _same_formula(module: nn.Module, eps: float) -> bool:
    """The module's own forward equals the reference bit for bit on a probe (its dtype, device)."""
    w = module.weight
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, w.shape[0], generator=gen) * 2).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        try:
            return bool(torch.equal(module(probe), alto_kernels.rms_norm_reference(probe, w, eps)))
        except Exception:  # noqa: BLE001 - a forward that needs more than a tensor is not a plain norm
            return False


def fuse_rms_norms(backbone: nn.Module, runtime: LoRARuntime) -> int:
    """Replace every plain, frozen RMSNorm of ``backbone``; returns how many were replaced."""
    if os.environ.get("ALTO_FUSED_NORM", "1").strip() in ("0", "false", "no"):
        return 0
    replaced = 0
    for name, module in list(backbone.named_modules()):
        if not type(module).__name__.endswith("RMSNorm") or isinstance(module, FusedRMSNorm):
            continue
        w, eps = getattr(module, "weight", None), _eps(module)
        if (not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None or w.requires_grad
                or type(w.data) is not torch.Tensor or w.device.type == "meta"):
            continue  # trainable, sharded (DTensor) or not materialised: keep the module
        if not _same_formula(module, eps):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, child, FusedRMSNorm(w, eps, runtime, type(module).__name__))
        replaced += 1
    return replaced
