"""The backbone's RMSNorms and SwiGLU activations through fused kernels on GPUs.

Eager RMSNorm is six to eight elementwise kernels each way in fp32 over every token of the
group; on an H100 they were ~40 ms of a 341 ms Llama-8B step. ``FusedRMSNorm`` takes a norm's
place holding the *same* ``weight`` Parameter under the same name, so state-dict keys, PEFT
export and loading are unchanged. A module is replaced only if its own forward gives exactly
``rms_norm_reference`` on a probe input: a variant with another formula (Gemma's ``1 + weight``,
a norm without the intermediate rounding) keeps its own module. ``ALTO_FUSED_NORM=0`` turns the
replacement off.

Likewise a gated MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU, Llama's
``LlamaMLP`` and its relatives) becomes ``FusedGatedMLP``, the same three child modules around
``alto_kernels.silu_mul`` (one pass each way; ``silu(g)`` is not kept for the backward):
``ALTO_FUSED_MLP=0`` turns it off.

A backbone FSDP2-sharded for rank-local groups (``alto_ray.cluster.ranklocal_model``) holds
DTensor shards that FSDP gathers onto their modules around each unit's forward. Its modules are
probed on a twin with plain random weights of the same shapes (``_plain_twin``: the formula, not
the values, is what the probe checks, and a twin needs no collectives); a sharded norm's fused
module reads the weight from the norm it replaces at every call (FSDP swaps the gathered weight
onto that module, not ours), and the gated MLP holds the same child modules anyway. Modules with
unmaterialised (meta, unsharded) parameters are left alone.

Rotary embeddings are not a module: attention forwards call their modeling file's
``apply_rotary_pos_emb``. ``fuse_rotary`` replaces that global in each modeling file whose
function gives exactly ``rotary_reference`` on a probe, with a dispatcher that runs
``alto_kernels.rotary`` only inside a ``MultiLoRAModel.batch`` of a model that asked for it
(``rotary_scope``) and calls the original everywhere else: another model in the process, a
PEFT baseline, an argument the kernel does not take. ``ALTO_FUSED_ROPE=0`` turns it off.
"""
from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import alto_kernels
import torch
from torch import nn

from .lora import LoRARuntime


class FusedRMSNorm(nn.Module):
    """A frozen RMSNorm: the fused kernel where the model's kernels run, the same formula elsewhere.

    Holds the norm's ``weight`` Parameter under the same name, or, for a sharded norm, the norm
    itself as ``source``: FSDP sets the gathered weight on that module for the length of its
    unit's forward, so the weight is read there at each call."""

    def __init__(self, weight: Optional[nn.Parameter], eps: float, runtime: LoRARuntime, replaces: str,
                 source: Optional[nn.Module] = None) -> None:
        super().__init__()
        if source is None:
            self.weight = weight
        self.source = source
        self.variance_epsilon = float(eps)
        self.runtime = runtime
        self.replaces = replaces  # the original class, for repr and debugging

    def current_weight(self) -> torch.Tensor:
        return self.weight if self.source is None else self.source.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.current_weight()
        plain = type(w.data) is torch.Tensor
        if (hidden_states.is_cuda and not w.requires_grad and plain
                and self.runtime.uses_triton(hidden_states.device)):
            return alto_kernels.rms_norm(hidden_states, w, self.variance_epsilon)
        if not plain:  # a shard outside its unit's forward: only the module's own code knows
            return self.source(hidden_states)
        return alto_kernels.rms_norm_reference(hidden_states, w, self.variance_epsilon)

    def extra_repr(self) -> str:
        shard = ", sharded" if self.source is not None else ""
        return f"{tuple(self.current_weight().shape)}, eps={self.variance_epsilon}, replaces={self.replaces}{shard}"


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


def _enabled(var: str) -> bool:
    return os.environ.get(var, "1").strip().lower() not in ("0", "false", "no")


def _is_shard(p: torch.Tensor) -> bool:
    """A DTensor parameter (FSDP2's shard of it): gathered onto its module around the unit's forward."""
    return type(p.data) is not torch.Tensor and hasattr(p, "full_tensor")


def _probe_target(module: nn.Module) -> Optional[nn.Module]:
    """What a formula probe can run: the module itself when plain, a plain twin when some of
    its parameters are shards, None when any is unmaterialised."""
    params = list(module.parameters())
    if all(type(p.data) is torch.Tensor and p.device.type != "meta" for p in params):
        return module
    if all(_is_shard(p) or (type(p.data) is torch.Tensor and p.device.type != "meta") for p in params):
        return _plain_twin(module)
    return None


def _plain_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same class, code and settings) whose parameters are plain
    random CPU tensors of the same shapes and dtypes, and whose children are twins too; hooks
    are left off. ``module`` itself is untouched."""
    gen = torch.Generator().manual_seed(0)

    def twin(m: nn.Module) -> nn.Module:
        t = copy.copy(m)
        t._parameters = {n: None if p is None else nn.Parameter(
            torch.randn(tuple(p.shape), generator=gen).to(p.dtype), requires_grad=False)
            for n, p in m._parameters.items()}
        t._buffers = {n: None if b is None else torch.zeros(tuple(b.shape), dtype=b.dtype)
                      for n, b in m._buffers.items()}
        t._modules = {n: None if c is None else twin(c) for n, c in m._modules.items()}
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(m, hooks):
                setattr(t, hooks, type(getattr(m, hooks))())
        return t

    return twin(module)


def _swap(backbone: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, child, new)


def fuse_rms_norms(backbone: nn.Module, runtime: LoRARuntime) -> int:
    """Replace every plain, frozen RMSNorm of ``backbone``; returns how many were replaced."""
    if not _enabled("ALTO_FUSED_NORM"):
        return 0
    replaced = 0
    modules = list(backbone.named_modules())
    sources = {id(m.source) for _, m in modules if isinstance(m, FusedRMSNorm) and m.source is not None}
    for name, module in modules:
        if (not type(module).__name__.endswith("RMSNorm") or isinstance(module, FusedRMSNorm)
                or id(module) in sources):
            continue
        w, eps = getattr(module, "weight", None), _eps(module)
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None or w.requires_grad:
            continue  # trainable or not a plain norm: keep the module
        probe = _probe_target(module)
        if probe is None or not _same_formula(probe, eps):
            continue  # not materialised, or another formula
        if probe is module:
            new = FusedRMSNorm(w, eps, runtime, type(module).__name__)
        else:
            new = FusedRMSNorm(None, eps, runtime, type(module).__name__, source=module)
        _swap(backbone, name, new)
        replaced += 1
    return replaced


class FusedGatedMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) · up_proj(x))`` with the product fused on GPUs; the same
    child modules (LoRA-wrapped or not) under the same names as the module it replaces."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, runtime: LoRARuntime,
                 replaces: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.runtime = runtime
        self.replaces = replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if g.is_cuda and self.runtime.uses_triton(g.device):
            return self.down_proj(alto_kernels.silu_mul(g, u))
        return self.down_proj(alto_kernels.silu_mul_reference(g, u))

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _same_mlp(module: nn.Module) -> bool:
    """The module's forward is ``down(silu(gate(x)) * up(x))``, bit for bit on a probe."""
    w = next(module.parameters())
    width = getattr(module.gate_proj, "in_features", None)
    if width is None:
        return False
    probe = (torch.randn(2, width, generator=torch.Generator().manual_seed(0))).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        try:
            want = module.down_proj(alto_kernels.silu_mul_reference(module.gate_proj(probe), module.up_proj(probe)))
            return bool(torch.equal(module(probe), want))
        except Exception:  # noqa: BLE001 - not a plain gated MLP
            return False


def fuse_gated_mlps(backbone: nn.Module, runtime: LoRARuntime) -> int:
    """Replace every plain SiLU-gated MLP of ``backbone``; returns how many were replaced."""
    if not _enabled("ALTO_FUSED_MLP"):
        return 0
    replaced = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, FusedGatedMLP) or not all(
                isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        if not _is_silu(getattr(module, "act_fn", None)):
            continue
        probe = _probe_target(module)
        if probe is None or not _same_mlp(probe):
            continue
        _swap(backbone, name, FusedGatedMLP(module.gate_proj, module.up_proj, module.down_proj, runtime,
                                            type(module).__name__))
        replaced += 1
    return replaced


ROTARY_FUNCTION = "apply_rotary_pos_emb"
_ROTARY_RUNTIME: "contextvars.ContextVar[Optional[LoRARuntime]]" = contextvars.ContextVar(
    "alto_rotary_runtime", default=None)


@contextmanager
def rotary_scope(runtime: LoRARuntime) -> Iterator[None]:
    """Calls of a patched ``apply_rotary_pos_emb`` in this scope may use the fused kernel."""
    token = _ROTARY_RUNTIME.set(runtime)
    try:
        yield
    finally:
        _ROTARY_RUNTIME.reset(token)


def _rotary_dispatcher(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        rt = _ROTARY_RUNTIME.get()
        if rt is not None and not args and (not kwargs or set(kwargs) == {"unsqueeze_dim"}) \
                and isinstance(q, torch.Tensor) and rt.uses_triton(q.device):
            from alto_kernels import fused_rotary

            dim = kwargs.get("unsqueeze_dim", 1)
            if fused_rotary.check_rotary(q, k, cos, sin, dim) is None:
                return fused_rotary.rotary(q, k, cos, sin, dim, checked=True)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.alto_original = original
    return apply_rotary_pos_emb


def _same_rotary(fn: Callable) -> bool:
    """``fn`` is HF's rotary formula bit for bit on a bf16 probe (GQA shapes, per-row positions)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen).bfloat16()
    k = torch.randn(2, 2, 5, 8, generator=gen).bfloat16()
    cos, sin = (torch.randn(2, 5, 8, generator=gen).bfloat16() for _ in range(2))
    try:
        got = fn(q, k, cos, sin)
        want = alto_kernels.rotary_reference(q, k, cos, sin)
        return all(torch.equal(g, w) for g, w in zip(got, want))
    except Exception:  # noqa: BLE001 - another signature or contract: not this formula
        return False


def fuse_rotary(backbone: nn.Module) -> int:
    """Patch the rotary function of every modeling file whose attention modules in ``backbone``
    call it (once per file, for the process); returns how many attention modules will use it."""
    if not _enabled("ALTO_FUSED_ROPE"):
        return 0
    count = 0
    for module in backbone.modules():
        # unwrap: with the `kernels` package installed, transformers wraps attention forwards
        # (``use_kernelized_func``); the modeling file's own forward is the one that names it.
        forward = getattr(type(module), "forward", None)
        forward = inspect.unwrap(forward) if callable(forward) else forward
        if ROTARY_FUNCTION not in getattr(getattr(forward, "__code__", None), "co_names", ()):
            continue
        namespace = vars(sys.modules[type(module).__module__])
        fn = namespace.get(ROTARY_FUNCTION)
        if fn is None or not callable(fn):
            continue
        if not hasattr(fn, "alto_original"):
            if not _same_rotary(fn):
                continue
            namespace[ROTARY_FUNCTION] = _rotary_dispatcher(fn)
        count += 1
    return count
