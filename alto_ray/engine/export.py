"""PEFT export: an adapter directory that ``PeftModel.from_pretrained`` (and vLLM, TGI) load as is."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from .model import AdapterWeights

WEIGHTS_NAME = "adapter_model.safetensors"


def peft_state_dict(weights: AdapterWeights) -> Dict[str, torch.Tensor]:
    """PEFT's saved key names: ``base_model.model.<module path>.lora_{A,B}.weight`` (no adapter name)."""
    out: Dict[str, torch.Tensor] = {}
    for entry, a, b in weights.lora_pairs():
        prefix = f"base_model.model.{entry.module_name}"
        out[f"{prefix}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous().clone()
        out[f"{prefix}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def save_peft_adapter(weights: AdapterWeights, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``adapter_config.json`` (via ``peft.LoraConfig``) and ``adapter_model.safetensors``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = weights.cfg
    os.makedirs(path, exist_ok=True)
    # Only the module names this adapter really has (``target_modules`` suffixes as PEFT matches them).
    suffixes = sorted({e.module_name.rsplit(".", 1)[-1] for e in weights.entries})
    LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=float(cfg.dropout), target_modules=suffixes,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
               ).save_pretrained(path)
    save_file(peft_state_dict(weights), os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
