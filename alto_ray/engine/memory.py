"""Memory estimates for admission control (the group) and placement (the allocator).

Both use the same formulas, from shapes only (the model is built on the ``meta`` device, so no
weights are touched). They are deliberate over-estimates of steady-state peaks; callers correct
them with measurement.

backbone  = n_params · bytes(dtype)

adapter   = P · (4 + 4 + 8)            fp32 master, fp32 grad, AdamW exp_avg + exp_avg_sq
          + P · 2 · bytes(dtype)       the per-step cast copy and its grad
          + T · L · per_layer          activations saved for backward, T = batch_size · max_seq_len
          + T · V · bytes(dtype)       logits (the fused loss writes its gradient over them;
                                       ALTO_FUSED_CE=0 or ``fused_loss=False``: + T · V · 8 for
                                       their fp32 upcast and its gradient)
          + T · 3 · I · bytes(dtype)   transient backward buffers of the largest MLP

per_layer = bytes(dtype) · (6·h + 4·kv + 4·I)   norms' inputs, q/k after RoPE, attention
                                                 q/k/v/out, MLP gate/up/act/product
          + 8 · max(16, r) · m                   fp32 LoRA shrink outputs H_s and the backward's G
                                                 (zeroed in the forward) of the m targeted modules

with P the adapter's LoRA parameter count (Σ over targeted linears of r·(in+out)), h hidden
size, kv the key/value width, I the MLP width, V the vocabulary and L the number of layers.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .config import AdapterConfig


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=32)
def _shapes(config_json: str, model_type: str) -> Tuple[int, Tuple[Tuple[str, int, int], ...]]:
    """(n_params, ((linear name, in, out), ...)) of the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import json

    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear))
    return n_params, linears


def _model_shapes(model_config: Any) -> Tuple[int, Tuple[Tuple[str, int, int], ...]]:
    d = model_config.to_dict()
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    import json
    return _shapes(json.dumps(d, sort_keys=True, default=str), model_config.model_type)


def estimate_backbone_bytes(model_config: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the frozen backbone's weights in ``dtype``."""
    n_params, _ = _model_shapes(model_config)
    return n_params * _dtype_bytes(dtype)


def lora_param_count(model_config: Any, cfg: AdapterConfig) -> Tuple[int, int]:
    """(LoRA parameters, number of targeted linears) of ``cfg`` on this model."""
    _, linears = _model_shapes(model_config)
    hits = [(i, o) for name, i, o in linears
            if any(name == t or name.endswith("." + t) for t in cfg.target_modules)]
    return sum(cfg.rank * (i + o) for i, o in hits), len(hits)


def fused_loss_enabled() -> bool:
    """Whether a GPU group computes its token loss with ``alto_kernels.cross_entropy``
    (``ALTO_FUSED_CE``, default on)."""
    return os.environ.get("ALTO_FUSED_CE", "1").strip().lower() not in ("0", "false", "no", "off")


def estimate_adapter_breakdown(model_config: Any, cfg: AdapterConfig, dtype: torch.dtype = torch.bfloat16,
                               fused_loss: Optional[bool] = None) -> Dict[str, int]:
    """The terms of ``estimate_adapter_bytes`` (see the module doc): state, activations,
    logits, transient. ``fused_loss``: whether the group's loss is the fused kernel (a GPU
    group; default ``fused_loss_enabled()``); without it the loss holds two fp32 copies more."""
    b = _dtype_bytes(dtype)
    p, modules = lora_param_count(model_config, cfg)
    h = int(model_config.hidden_size)
    layers = int(model_config.num_hidden_layers)
    heads = int(model_config.num_attention_heads)
    head_dim = int(getattr(model_config, "head_dim", None) or h // heads)
    kv = int(getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    inter = int(getattr(model_config, "intermediate_size", None) or 4 * h)
    vocab = int(model_config.vocab_size)
    tokens = cfg.batch_size * cfg.max_seq_len
    fused = fused_loss_enabled() if fused_loss is None else bool(fused_loss)
    per_layer = b * (6 * h + 4 * kv + 4 * inter) + 8 * max(16, cfg.rank) * modules / max(1, layers)
    return {"state": int(p * (4 + 4 + 8) + p * 2 * b),
            "activations": int(tokens * layers * per_layer),
            "logits": int(tokens * vocab * (b + (0 if fused else 8))),
            "transient": int(tokens * 3 * inter * b)}


def estimate_adapter_bytes(model_config: Any, cfg: AdapterConfig, dtype: torch.dtype = torch.bfloat16,
                           fused_loss: Optional[bool] = None) -> int:
    """Bytes one adapter adds to a group: its training state plus the activations of its
    ``batch_size × max_seq_len`` tokens through the frozen backbone (formula in the module doc)."""
    return sum(estimate_adapter_breakdown(model_config, cfg, dtype, fused_loss).values())


def estimate_summary(model_config: Any, cfg: AdapterConfig, dtype: torch.dtype = torch.bfloat16) -> Dict[str, int]:
    """Both estimates plus the LoRA parameter count, for logs and the allocator."""
    p, modules = lora_param_count(model_config, cfg)
    return {"backbone_bytes": estimate_backbone_bytes(model_config, dtype),
            "adapter_bytes": estimate_adapter_bytes(model_config, cfg, dtype),
            "lora_params": p, "lora_modules": modules}
