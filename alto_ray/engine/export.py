"""PEFT export: an adapter directory that ``PeftModel.from_pretrained`` (and vLLM, TGI) load as is."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

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


@dataclass
class PeftSnapshot:
    """An adapter's PEFT files as CPU data: taken between steps, written any time later (so a
    checkpoint holds the training loop only for the device-to-host copies)."""

    tensors: Dict[str, torch.Tensor]
    rank: int
    alpha: float
    dropout: float
    target_modules: List[str]
    base_model_name_or_path: Optional[str] = None


def peft_snapshot(weights: AdapterWeights, base_model_name_or_path: Optional[str] = None) -> PeftSnapshot:
    cfg = weights.cfg
    # Only the module names this adapter really has (``target_modules`` suffixes as PEFT matches them).
    suffixes = sorted({e.module_name.rsplit(".", 1)[-1] for e in weights.entries})
    return PeftSnapshot(peft_state_dict(weights), cfg.rank, cfg.alpha, float(cfg.dropout), suffixes,
                        base_model_name_or_path)


def save_peft_snapshot(snap: PeftSnapshot, path: str) -> None:
    """Write ``adapter_config.json`` (via ``peft.LoraConfig``) and ``adapter_model.safetensors``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    LoraConfig(r=snap.rank, lora_alpha=snap.alpha, lora_dropout=snap.dropout, target_modules=snap.target_modules,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=snap.base_model_name_or_path,
               ).save_pretrained(path)
    save_file(snap.tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def save_peft_adapter(weights: AdapterWeights, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``adapter_config.json`` (via ``peft.LoraConfig``) and ``adapter_model.safetensors``."""
    save_peft_snapshot(peft_snapshot(weights, base_model_name_or_path), path)
