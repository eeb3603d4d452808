"""The backbone's RMSNorms are swapped for FusedRMSNorm only where that changes nothing but speed."""
from __future__ import annotations

import torch
from torch import nn


def test_llama_norms_are_replaced_with_the_same_weights_and_outputs(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from alto_ray.engine import MultiLoRAModel
    from alto_ray.engine.norm import FusedRMSNorm

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    norm_keys = {k for k in plain.state_dict() if "norm" in k}
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    n_layers = model.backbone.config.num_hidden_layers
    assert model.fused_norms == 2 * n_layers + 1  # input + post-attention norm per layer, final norm
    fused = [m for m in model.backbone.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == model.fused_norms and all(m.replaces == "LlamaRMSNorm" for m in fused)
    # the norms' parameter names are unchanged (the LoRA wrappers' own keys are another matter)
    assert {k for k in model.backbone.state_dict() if "norm" in k} == norm_keys
    with torch.no_grad():
        got = model.backbone(input_ids=ids).logits
    assert torch.equal(got, want)  # off the GPU it is the same formula, op for op


class OffsetRMSNorm(nn.Module):
    """Gemma's variant: ``(1 + weight)``; same attributes as a Llama norm, another formula."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h.to(x.dtype)


def test_norms_with_another_formula_or_a_trainable_weight_are_left_alone(monkeypatch) -> None:
    from alto_ray.engine import LoRARuntime
    from alto_ray.engine.norm import fuse_rms_norms

    model = nn.Sequential(OffsetRMSNorm(8), OffsetRMSNorm(8))
    assert fuse_rms_norms(model, LoRARuntime()) == 0
    assert all(isinstance(m, OffsetRMSNorm) for m in model)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(LlamaRMSNorm(8), LlamaRMSNorm(8))
    model[0].weight.requires_grad_(False)  # model[1] stays trainable: the kernel has no dW
    assert fuse_rms_norms(model, LoRARuntime()) == 1
    assert type(model[0]).__name__ == "FusedRMSNorm" and isinstance(model[1], LlamaRMSNorm)
    monkeypatch.setenv("ALTO_FUSED_NORM", "0")
    fresh = nn.Sequential(LlamaRMSNorm(8)).requires_grad_(False)
    assert fuse_rms_norms(fresh, LoRARuntime()) == 0
