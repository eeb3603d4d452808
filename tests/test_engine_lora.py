"""MultiLoRALinear: per-row deltas, subsets of adapters per layer, slot reuse."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from alto_ray.engine import BatchLayout, LoRARuntime, LoRASlot, MultiLoRALinear


def _layer(in_f=6, out_f=5):
    torch.manual_seed(0)
    rt = LoRARuntime(backend="reference")
    return MultiLoRALinear(nn.Linear(in_f, out_f, bias=True), rt), rt


def test_rows_get_only_their_adapters_delta_and_absent_adapters_none():
    layer, rt = _layer()
    ranks = {0: 2, 1: 3, 2: 1}
    weights = {s: (torch.randn(r, 6), torch.randn(5, r)) for s, r in ranks.items()}
    scales = {0: 0.5, 1: 2.0, 2: 1.0}
    for s, r in ranks.items():
        if s != 1:  # adapter in slot 1 does not target this layer
            layer.add_slot(s, LoRASlot(f"a{s}", r, scales[s], 0.0, piece=0))
    # packed order: slot 2 rows 0-3, slot 1 rows 3-5, slot 0 rows 5-9
    rt.layout = BatchLayout(slots=(2, 1, 0), row_ranges=((0, 3), (3, 5), (5, 9)), total_rows=9)
    rt.weights = {s: (a, b) for s, (a, b) in weights.items()}
    x = torch.randn(3, 3, 6)  # [B, L, in] flattened to 9 rows
    y = layer(x).reshape(9, 5)
    base = layer.base(x).reshape(9, 5)
    x2 = x.reshape(9, 6)
    a2, b2 = weights[2]
    a0, b0 = weights[0]
    torch.testing.assert_close(y[0:3], base[0:3] + x2[0:3] @ a2.t() @ b2.t() * 1.0)
    torch.testing.assert_close(y[3:5], base[3:5])  # slot 1 absent: no delta
    torch.testing.assert_close(y[5:9], base[5:9] + x2[5:9] @ a0.t() @ b0.t() * 0.5)
    runs = rt.layout.runs_for(layer._present)
    assert [(r.lo, r.hi, r.slots) for r in runs] == [(0, 3, (2,)), (5, 9, (0,))]


def test_no_layout_means_base_output_and_slots_are_reused():
    layer, rt = _layer()
    x = torch.randn(4, 6)
    layer.add_slot(0, LoRASlot("a", 2, 1.0, 0.0, piece=0))
    torch.testing.assert_close(layer(x), layer.base(x))  # outside a step: no adapter applies
    with pytest.raises(ValueError, match="taken"):
        layer.add_slot(0, LoRASlot("b", 2, 1.0, 0.0, piece=0))
    layer.remove_slot(0)
    layer.add_slot(0, LoRASlot("b", 2, 1.0, 0.0, piece=0))
    assert layer.slots[0].name == "b"


def test_gradients_reach_only_the_owning_adapter():
    layer, rt = _layer()
    masters = {0: torch.randn(2 * 6 + 5 * 2, requires_grad=True), 1: torch.randn(3 * 6 + 5 * 3, requires_grad=True)}
    layer.add_slot(0, LoRASlot("a", 2, 1.0, 0.0, piece=0))
    layer.add_slot(1, LoRASlot("b", 3, 1.0, 0.0, piece=0))
    rt.layout = BatchLayout(slots=(0, 1), row_ranges=((0, 4), (4, 8)), total_rows=8)
    rt.weights = {0: (masters[0][:12].view(2, 6), masters[0][12:].view(5, 2)),
                  1: (masters[1][:18].view(3, 6), masters[1][18:].view(5, 3))}
    x = torch.randn(8, 6)
    layer(x)[:4].sum().backward()  # a loss on adapter 0's rows only
    assert masters[0].grad.abs().sum() > 0
    assert masters[1].grad is None or masters[1].grad.abs().sum() == 0
