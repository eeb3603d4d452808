"""Sibling linears: the wrapped q/k/v (or gate/up) of one module, run as one autograd node.

An attention module calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same ``x`` (a
gated MLP ``gate_proj`` and ``up_proj``). Each is a one-node linear (``apply_linear_multi_lora``)
whose backward returns its own dX, and autograd adds the three with two add kernels over
``[tokens, hidden]``: on the Llama-8B step 96 of its 221 add kernels (~3 ms). Grouped, the first
sibling called runs ``alto_kernels.apply_sibling_linears_multi_lora`` for all of them, which sums
the input gradient inside its backward, and keeps the others' outputs until they are called with
the same ``x`` (the same tensor object, in the same batch); a call with any other input, or a
sibling that would take another path (adapters in some rows only, a bias, ``ALTO_LINEAR_GEMM``),
runs as before. ``ALTO_SIBLING_LINEARS=0`` turns the grouping off.

The node's backward reads X once and writes the siblings' summed LoRA dX once
(``lora_bwd_dx_siblings``; ``ALTO_SIBLING_DX_PASS=0``: one ``lora_bwd_dx`` each, adding into the
first's): on an H200 0.9-1.3 ms less dX time per 8B step and +0.2% / +2.5% tokens/s in two
alternating pairs. On an H100 (Llama-8B shapes, 8 x 512 tokens) the grouping with a pass each had 94 fewer
add kernels and 1.2 ms less device time (of ~250 ms) in each of two alternating pairs; tokens/s
moved by less than its run-to-run noise (BENCHMARKS.md, Engine).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .lora import MultiLoRALinear

# Child names of one module that are called on one input, in call order.
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def siblings_enabled() -> bool:
    return os.environ.get("ALTO_SIBLING_LINEARS", "1").strip().lower() not in ("0", "false", "no", "off")


class SiblingGroup:
    """Wrapped linears called on the same input; the outputs of a group call wait here for the
    siblings that have not been called yet."""

    def __init__(self, members: List[MultiLoRALinear]) -> None:
        self.members = members
        self._index = {id(m): i for i, m in enumerate(members)}
        self._pending: Dict[int, torch.Tensor] = {}
        self._pending_x: Optional[torch.Tensor] = None
        self._pending_layout: object = None
        self.calls = 0  # group calls run (for tests and benchmarks)

    def _clear(self) -> None:
        self._pending, self._pending_x, self._pending_layout = {}, None, None

    def output(self, member: MultiLoRALinear, x: torch.Tensor, x2: torch.Tensor) -> Optional[torch.Tensor]:
        """``member``'s output for ``x`` (``x2`` its 2-D rows): kept from a group call on this very
        ``x``, else from a new group call; None where the group cannot run (the caller's own path)."""
        i = self._index[id(member)]
        layout = member.runtime.layout
        if self._pending_x is x and self._pending_layout is layout and i in self._pending:
            y = self._pending.pop(i)
            if not self._pending:
                self._clear()
            return y
        calls = []
        for m in self.members:
            if (m.base.bias is not None or not m._linear_epilogue or m._linear_gemm or m._present != member._present
                    or m.in_features != member.in_features):
                return None
            call = m.one_node_call(x2)
            if call is None:
                return None
            calls.append(call)
        streams = next((c[2] for c in calls if c[2]), {})
        import alto_kernels.sibling_linear as sibling_linear

        ys = sibling_linear.apply_sibling_linears_multi_lora([c[0] for c in calls], x2,
                                                             [m.base.weight for m in self.members],
                                                             [c[1] for c in calls], **streams)
        self.calls += 1
        self._pending = {j: y for j, y in enumerate(ys) if j != i}
        self._pending_x, self._pending_layout = x, layout
        return ys[i]


def group_sibling_linears(backbone: nn.Module) -> int:
    """Group the wrapped sibling linears of every module of ``backbone`` (again after more
    targets are wrapped); returns how many groups there are. Off with ``ALTO_SIBLING_LINEARS=0``."""
    if not siblings_enabled():
        return 0
    groups = 0
    for module in backbone.modules():
        for names in SIBLING_SETS:
            members = [getattr(module, n, None) for n in names]
            members = [m for m in members if isinstance(m, MultiLoRALinear)]
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = SiblingGroup(members)
            for m in members:
                object.__setattr__(m, "sibling_group", group)
            groups += 1
    return groups
