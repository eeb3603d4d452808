"""Sharding a frozen backbone across the ranks of one adapter group with FSDP2.

Rank-local adapter parallelism (see ``ranklocal.py``) shards only the *frozen* backbone: every
rank all-gathers each decoder layer's weights just before using it and frees them after, so a
model that does not fit one GPU fits N. The LoRA weights are never module parameters (the
engine keeps each adapter as one flat fp32 tensor handed to the layers per step), so FSDP never
sees them: they stay plain local tensors on the rank that owns the adapter.

FSDP units: every decoder layer; the output head (unless tied to the input embedding); and the
decoder (embeddings + final norm) as a root. The head and the decoder are two separate roots on
purpose: the engine calls ``backbone.get_decoder()`` and ``backbone.get_output_embeddings()``
directly (it skips logits of unlabelled positions), so a single root on the whole causal LM would
never run its pre-forward and its parameters would stay sharded.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from alto_ray.engine.model import freeze

NCCL_GUARDS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def apply_nccl_guards() -> None:
    """NVLink multicast (NVLS) stays off on the lent GPU machines; set before any NCCL init."""
    for key, value in NCCL_GUARDS.items():
        os.environ.setdefault(key, value)


def default_backend(device: Union[str, torch.device]) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port free on this host now (rank 0 binds it for the rendezvous moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_rank_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                            backend: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                            timeout_s: float = 600.0) -> None:
    """Join the group's process group (idempotent: a second call with one already up is a no-op)."""
    if dist.is_initialized():
        return
    apply_nccl_guards()
    backend = backend or default_backend(device)
    kwargs: dict = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)  # eager NCCL init, bound to this rank's GPU
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def rank_mesh(device: Union[str, torch.device]) -> Any:
    """A 1-D device mesh over the default process group (every rank of the adapter group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def decoder_layers(backbone: nn.Module) -> List[nn.Module]:
    """The repeated blocks of a HF causal LM (``model.layers`` in Llama-like models)."""
    decoder = backbone.get_decoder()
    for attr in ("layers", "h", "blocks", "block"):
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError(f"{type(backbone).__name__}: cannot find the decoder layers to shard")


def head_is_tied(backbone: nn.Module) -> bool:
    head, emb = backbone.get_output_embeddings(), backbone.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def shard_backbone(backbone: nn.Module, mesh: Any = None, reshard_after_forward: bool = True,
                   device: Union[str, torch.device, None] = None) -> nn.Module:
    """FSDP2-shard a frozen backbone in place (see the module docstring for the units).

    Call it before the engine injects LoRA (``GroupedTrainer(model=backbone)``): injection wraps
    the (already FSDP-managed) ``nn.Linear`` modules, whose parameters FSDP keeps finding by
    module reference. Gradient sync is switched off on every unit: frozen weights get no grads,
    so there is nothing to reduce-scatter, and the flag makes that a guarantee rather than a
    consequence. A tied head stays replicated (it is the embedding, owned by the decoder root).
    ``device`` (default: where the weights are) is where the shards go: a CPU-loaded model is
    moved to the GPU unit by unit, never whole.
    """
    from torch.distributed.fsdp import fully_shard

    freeze(backbone)
    if any(p.requires_grad for p in backbone.parameters()):
        raise AssertionError("rank-local sharding expects a fully frozen backbone")
    mesh = mesh if mesh is not None else rank_mesh(device if device is not None else _param_device(backbone))
    units = []
    for layer in decoder_layers(backbone):
        units.append(fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward))
    head = backbone.get_output_embeddings()
    if head is not None and not head_is_tied(backbone):
        units.append(fully_shard(head, mesh=mesh))
    units.append(fully_shard(backbone.get_decoder(), mesh=mesh))
    for unit in units:
        unit.set_requires_gradient_sync(False)
    return backbone


def load_sharded_backbone(source: str, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None,
                          reshard_after_forward: bool = True) -> nn.Module:
    """Load a checkpoint (path or hub id) on the host, then shard it onto ``device`` unit by unit.

    Every rank reads the whole checkpoint into host memory once (N copies per node for a
    moment); a rank-0 read + broadcast (``torch.distributed.checkpoint.state_dict``) would
    avoid that and is left for when host memory is the limit.
    """
    from alto_ray.engine.model import load_backbone

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(source, "cpu", dtype)
    return shard_backbone(backbone, reshard_after_forward=reshard_after_forward, device=device)


def _param_device(module: nn.Module) -> torch.device:
    dev = next(module.parameters()).device
    if dev.type == "meta":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev


def build_random_sharded_backbone(config: Any, device: Union[str, torch.device], dtype: torch.dtype,
                                  seed: int = 0, mesh: Any = None, std: float = 0.02,
                                  reshard_after_forward: bool = True) -> nn.Module:
    """A causal LM of ``config``'s shape with random weights, built on the meta device, sharded,
    then only each rank's shard materialised on ``device`` (never the full model anywhere).

    For benchmarks of big shapes: weights ~ N(0, std), norms 1, seeded per rank.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    mesh = mesh if mesh is not None else rank_mesh(device)
    shard_backbone(model, mesh, reshard_after_forward)
    model.to_empty(device=device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator(device=device).manual_seed(int(seed) * 1009 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.dim() == 1:  # RMSNorm / LayerNorm weights (biases would be zero)
                local.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                local.normal_(0.0, std, generator=gen)
    _rebuild_rotary(model, config, device)
    return freeze(model)


def _rebuild_rotary(model: nn.Module, config: Any, device: torch.device) -> None:
    """``to_empty`` leaves computed buffers (RoPE frequencies) as garbage: recompute them."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=config).to(device)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def local_shard_numel(backbone: nn.Module) -> int:
    """Elements of the backbone's weights stored on this rank (a sharded model: ~1/N of all)."""
    total = 0
    for p in backbone.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def gathered_unit_bytes(backbone: nn.Module) -> int:
    """Most bytes of unsharded weights a rank holds beside its shard: the root and head units
    (embeddings, final norm, an untied head) plus two decoder layers (the running one and the one
    prefetched). Admission reserves them on every rank before counting adapters."""
    def full(module: nn.Module) -> int:  # a DTensor reports its global (unsharded) size
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layers = [full(layer) for layer in decoder_layers(backbone)]
    return full(backbone) - sum(layers) + 2 * max(layers, default=0)
