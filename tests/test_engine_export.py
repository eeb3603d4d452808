"""PEFT export: PeftModel.from_pretrained on a fresh backbone reproduces the engine's logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer

pytest.importorskip("peft")


def test_saved_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tiny_dataset_path, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu")
    t.add_adapter("full", AdapterConfig(rank=4, alpha=16, lr=2e-2, batch_size=4, max_seq_len=48, seed=1))
    t.add_adapter("part", AdapterConfig(rank=2, alpha=4, lr=2e-2, batch_size=4, max_seq_len=48, seed=2,
                                        target_modules="q_proj, down_proj"))
    for _ in range(3):
        t.step()
    ids = torch.tensor([t.data.eval_examples[0][0][:10], t.data.eval_examples[1][0][:10]])
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    for name in ("full", "part"):
        path = tmp_path / name
        t.save_adapter(name, str(path))
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["r"] == t.adapter_config(name).rank and cfg["peft_type"] == "LORA"
        keys = load_file(str(path / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        if name == "part":
            assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj"]
            assert not any("k_proj" in k for k in keys)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(fresh, str(path)).eval()
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits
        ours = t.logits(name, ids)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter does something
    assert os.path.exists(tmp_path / "full" / "adapter_model.safetensors")
