"""The backbone's RMSNorms and gated MLPs are swapped for fused modules only where that changes nothing but speed."""
from __future__ import annotations

import torch
from torch import nn


def test_llama_norms_are_replaced_with_the_same_weights_and_outputs(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from alto_ray.engine import MultiLoRAModel
    from alto_ray.engine.fused_modules import FusedRMSNorm

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    norm_keys = {k for k in plain.state_dict() if "norm" in k}
    keys = set(plain.state_dict())
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    n_layers = model.backbone.config.num_hidden_layers
    assert model.fused_norms == 2 * n_layers + 1  # input + post-attention norm per layer, final norm
    fused = [m for m in model.backbone.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == model.fused_norms and all(m.replaces == "LlamaRMSNorm" for m in fused)
    assert model.fused_mlps == n_layers
    mlp = model.backbone.model.layers[0].mlp
    assert type(mlp).__name__ == "FusedGatedMLP" and mlp.replaces == "LlamaMLP"
    assert type(mlp.gate_proj).__name__ == "MultiLoRALinear"  # the LoRA-wrapped children are kept
    # the norms' parameter names are unchanged (the LoRA wrappers' own keys are another matter)
    assert {k for k in model.backbone.state_dict() if "norm" in k} == norm_keys
    assert {k.replace(".base.", ".") for k in model.backbone.state_dict()} == keys  # MLPs keep their names
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
    from alto_ray.engine.fused_modules import fuse_rms_norms

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


class GeluMLP(nn.Module):
    """Gated like Llama's MLP but with GELU (Gemma): the fused SiLU product must not replace it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(n, 2 * n), nn.Linear(n, 2 * n), nn.Linear(2 * n, n)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SiluMLPWithBias(GeluMLP):
    """SiLU-gated but adding a bias after the product: the probe must catch another formula."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) + 1.0)


def test_gated_mlps_with_another_activation_or_formula_are_left_alone(monkeypatch) -> None:
    from alto_ray.engine import LoRARuntime
    from alto_ray.engine.fused_modules import FusedGatedMLP, fuse_gated_mlps

    model = nn.Sequential(GeluMLP(8), SiluMLPWithBias(8))
    assert fuse_gated_mlps(model, LoRARuntime()) == 0
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)
    model = nn.Sequential(LlamaMLP(cfg), LlamaMLP(cfg))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    assert fuse_gated_mlps(model, LoRARuntime()) == 2 and isinstance(model[0], FusedGatedMLP)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    monkeypatch.setenv("ALTO_FUSED_MLP", "0")
    assert fuse_gated_mlps(nn.Sequential(LlamaMLP(cfg)), LoRARuntime()) == 0


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """A rotary with another formula (rotates pairs, not halves): must keep its own function."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class PairRotaryAttention(nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_rotary_is_dispatched_only_for_the_same_formula_and_inside_a_batch(tiny_model_dir: str) -> None:
    import alto_kernels
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from alto_ray.engine import LoRARuntime, MultiLoRAModel
    from alto_ray.engine.fused_modules import fuse_rotary, rotary_scope

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    model = MultiLoRAModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    assert model.fused_rotary == model.backbone.config.num_hidden_layers
    patched = modeling_llama.apply_rotary_pos_emb
    assert hasattr(patched, "alto_original")  # the modeling file's global, for every Llama in the process
    with torch.no_grad():
        assert torch.equal(model.backbone(input_ids=ids).logits, want)  # off the GPU: the original runs
        assert torch.equal(plain(input_ids=ids).logits, want)           # another model: the original
    assert fuse_rotary(model.backbone) == model.fused_rotary and modeling_llama.apply_rotary_pos_emb is patched

    calls = []

    class CountingRuntime(LoRARuntime):
        def uses_triton(self, device):
            calls.append(device)
            return False  # ask, but take the original: the kernel itself is tested elsewhere
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    patched(q, k, cos, sin)
    assert calls == []  # no scope: not even asked
    with rotary_scope(CountingRuntime()):
        got = patched(q, k, cos, sin)
    assert len(calls) == 1 and all(torch.equal(g, w) for g, w in zip(got, alto_kernels.rotary_reference(q, k, cos, sin)))

    assert fuse_rotary(PairRotaryAttention()) == 0
    assert not hasattr(globals()["apply_rotary_pos_emb"], "alto_original")


def test_a_plain_twin_probes_a_module_without_touching_it() -> None:
    """Sharded (or otherwise unprobeable) modules are probed on a twin: same class and settings,
    plain random CPU weights of the same shapes and dtypes, no hooks; the module is untouched.
    Unmaterialised (meta) modules get no probe at all."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    from alto_ray.engine.fused_modules import _plain_twin, _probe_target, _same_formula, _same_mlp

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
    mlp = LlamaMLP(cfg).to(torch.bfloat16)
    before = {n: (p, p.detach().clone()) for n, p in mlp.named_parameters()}

    def refuse(*_: object) -> None:
        raise AssertionError("the twin ran the module's hooks")

    mlp.register_forward_pre_hook(refuse)
    twin = _plain_twin(mlp)
    assert type(twin) is LlamaMLP and twin is not mlp and twin.gate_proj is not mlp.gate_proj
    for name, p in twin.named_parameters():
        orig, value = before[name]
        assert p is not orig and p.shape == orig.shape and p.dtype == orig.dtype and not torch.equal(p, value)
    assert all(p is before[n][0] and torch.equal(p, before[n][1]) for n, p in mlp.named_parameters())
    assert _same_mlp(twin)                     # the formula holds on the twin's own weights
    norm = LlamaRMSNorm(16, eps=1e-6)
    assert _same_formula(_plain_twin(norm), 1e-6)
    assert _probe_target(norm) is norm         # a plain module is probed as it is
    with torch.device("meta"):
        ghost = LlamaMLP(cfg)
    assert _probe_target(ghost) is None
