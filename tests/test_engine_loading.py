"""Backbone loading and injection: config errors surface before any weight loads."""
from __future__ import annotations

import pytest
import torch

from alto_ray.engine import DEFAULT_TARGET_MODULES, AdapterConfig, DatasetSpec, GroupedTrainer, MultiLoRALinear
from alto_ray.engine.memory import estimate_adapter_bytes, estimate_backbone_bytes, lora_param_count


@pytest.fixture
def no_weight_loading(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the config was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_missing_model_path_fails_before_loading(tmp_path, tiny_dataset_path, no_weight_loading):
    with pytest.raises(ValueError, match="model"):
        GroupedTrainer(str(tmp_path / "missing_model"), DatasetSpec(tiny_dataset_path), device="cpu")


def test_bad_dataset_fails_before_loading(tmp_path, tiny_model_dir, no_weight_loading):
    with pytest.raises(ValueError, match="source"):
        GroupedTrainer(tiny_model_dir, DatasetSpec(str(tmp_path / "nope.jsonl")), device="cpu")
    with pytest.raises(ValueError, match="text_field"):
        GroupedTrainer(tiny_model_dir, DatasetSpec([{"body": "1"}]), device="cpu")


def test_injection_freezes_and_wraps(tiny_model_dir, tiny_dataset_path):
    t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu")
    backbone = t.model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    wrapped = [n for n, m in backbone.named_modules() if isinstance(m, MultiLoRALinear)]
    assert len(wrapped) == 2 * len(DEFAULT_TARGET_MODULES)
    assert not isinstance(backbone.lm_head, MultiLoRALinear)
    with pytest.raises(ValueError, match="target_modules"):
        GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu", target_modules=("qq_proj",))
    cfg = AdapterConfig(rank=4, target_modules=("q_proj", "down_proj"))
    t.add_adapter("a", cfg)
    p, modules = lora_param_count(backbone.config, cfg)
    assert modules == 4 and p == t.model.adapters["a"].master.numel()
    for entry, a, b in t.model.adapters["a"].lora_pairs():  # PEFT init: A kaiming-uniform, B zeros
        bound = 1.0 / entry.in_features ** 0.5
        assert b.abs().sum() == 0 and 0 < a.abs().max() <= bound


def test_memory_estimates_scale_sensibly(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    from transformers import AutoModelForCausalLM
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert estimate_backbone_bytes(config, torch.float32) == 4 * n
    assert estimate_backbone_bytes(config, torch.bfloat16) == 2 * n
    small = estimate_adapter_bytes(config, AdapterConfig(rank=4, batch_size=1, max_seq_len=64))
    assert estimate_adapter_bytes(config, AdapterConfig(rank=16, batch_size=1, max_seq_len=64)) > small
    assert estimate_adapter_bytes(config, AdapterConfig(rank=4, batch_size=4, max_seq_len=64)) > 3 * small


def test_memory_estimate_logits_follow_the_loss_path(tiny_model_dir, monkeypatch):
    """The fused loss (default) holds the logits only; F.cross_entropy two fp32 copies more."""
    from transformers import AutoConfig

    from alto_ray.engine.memory import estimate_adapter_breakdown
    config = AutoConfig.from_pretrained(tiny_model_dir)
    cfg = AdapterConfig(rank=4, batch_size=2, max_seq_len=64)
    tv = 2 * 64 * config.vocab_size
    fused = estimate_adapter_breakdown(config, cfg, torch.bfloat16, fused_loss=True)
    plain = estimate_adapter_breakdown(config, cfg, torch.bfloat16, fused_loss=False)
    assert fused["logits"] == tv * 2 and plain["logits"] == tv * (2 + 8)
    assert {k: v for k, v in fused.items() if k != "logits"} == {k: v for k, v in plain.items() if k != "logits"}
    monkeypatch.delenv("ALTO_FUSED_CE", raising=False)
    assert estimate_adapter_breakdown(config, cfg) == fused
    monkeypatch.setenv("ALTO_FUSED_CE", "0")
    assert estimate_adapter_breakdown(config, cfg) == plain
    assert estimate_adapter_bytes(config, cfg) == sum(plain.values())


def test_activation_estimate_is_close_to_what_autograd_saves():
    """Bytes of tensors saved for backward in one grouped forward vs the estimate's terms."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alto_ray.engine import TaskData, pack_batch
    from alto_ray.engine.memory import estimate_adapter_breakdown

    mc = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    examples = [(ids, ids) for ids in (torch.randint(0, 1000, (64,), generator=gen).tolist() for _ in range(4))]
    t = GroupedTrainer(model, TaskData.from_examples(examples), device="cpu")
    cfg = AdapterConfig(rank=8, batch_size=2, max_seq_len=64)
    t.add_adapter("a", cfg)
    batch = pack_batch([("a", examples[:2], 64)], 0, torch.device("cpu"))
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        t._token_loss_sums(batch, training=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(v for k, v in saved.items() if k not in weights)
    est = estimate_adapter_breakdown(mc, cfg, torch.float32, fused_loss=False)  # CPU: F.cross_entropy
    assert 0.8 < (est["activations"] + est["logits"]) / measured < 2.5
