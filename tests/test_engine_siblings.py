"""Sibling linears (q/k/v, gate/up) as one node in the engine: the numbers of one node each.

Runs in a subprocess through the fused Triton kernels under TRITON_INTERPRET (set before triton
is first imported).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
model_dir, data_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
one_pass = mode == "all"  # the siblings' dX in one lora_bwd_dx_siblings pass, or a lora_bwd_dx each
out = {}
for arm in ("0", "1"):
    os.environ["ALTO_SIBLING_LINEARS"] = arm
    import alto_kernels.sibling_linear as sibling_linear
    sibling_linear.ONE_PASS = one_pass
    t = GroupedTrainer(model_dir, DatasetSpec(data_path), device="cpu", backend="triton")
    t.add_adapter("a", AdapterConfig(rank=4, lr=1e-2, batch_size=2, max_seq_len=12, seed=1))
    t.add_adapter("b", AdapterConfig(rank=8, lr=1e-2, batch_size=1, max_seq_len=12, seed=2))
    c_targets = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj") if mode == "partial" else None
    t.add_adapter("c", AdapterConfig(rank=2, lr=1e-2, batch_size=1, max_seq_len=12, seed=3, dropout=0.3,
                                     **({"target_modules": c_targets} if c_targets else {})))
    with torch.no_grad():  # B starts at zero; nudge it so that dX's LoRA part is not 0
        gen = torch.Generator().manual_seed(5)
        for n, w in t.model.adapters.items():
            for e, a, b in w.lora_pairs():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    grads = {}
    step_fn = t._optimizer_step
    t._optimizer_step = lambda run, lr, norm: (grads.__setitem__(run.name, run.weights.master.grad.tolist()),
                                               step_fn(run, lr, norm))
    steps = [{k: v.loss for k, v in t.step().items()} for _ in range(2)]
    groups = {id(m.sibling_group): m.sibling_group for m in t.model.lora_layers.values() if m.sibling_group}
    from alto_kernels import sibling_linear
    out[arm] = {"steps": steps, "grads": grads, "groups": t.model.sibling_groups,
                "one_pass": sum(sibling_linear._BWD_DX_SIB.launches.values()),
                "group_calls": sum(g.calls for g in groups.values()),
                "pending": sum(len(g._pending) for g in groups.values())}
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["all", "partial"])
def test_sibling_linears_train_like_one_node_each(tiny_model_dir, tiny_dataset_path, interpreted_triton_env, mode):
    # "all": every adapter in every linear, so each layer's q/k/v and gate/up run as one node;
    # "partial": c leaves out k_proj, so the attention's siblings differ in adapters and run a node
    # each while gate/up stay grouped. Either way the losses and gradients of the grouping's arm
    # are those of one node per linear (c's dropout masks too: each sibling keeps its own seed).
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir, tiny_dataset_path, mode],
                          env=interpreted_triton_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    off, on = res["0"], res["1"]
    assert off["groups"] == 0 and off["group_calls"] == 0
    layers = 2  # the tiny model's decoder layers
    assert on["groups"] == 2 * layers
    # per step and layer: the attention's group (only with "all") and the MLP's; 2 steps
    assert on["group_calls"] == 2 * layers * (2 if mode == "all" else 1)
    assert on["pending"] == 0  # every kept output was taken by its sibling
    # "all": each group call's dX in one lora_bwd_dx_siblings launch (counted over the process);
    # "partial": a lora_bwd_dx each (as with ALTO_SIBLING_DX_PASS=0)
    assert off["one_pass"] == 0 and on["one_pass"] == (on["group_calls"] if mode == "all" else 0)
    for s_off, s_on in zip(off["steps"], on["steps"]):
        for name in ("a", "b", "c"):
            assert s_on[name] == pytest.approx(s_off[name], rel=1e-5, abs=1e-6)
    for name in ("a", "b", "c"):
        assert on["grads"][name] == pytest.approx(off["grads"][name], rel=1e-4, abs=1e-6)
        assert any(abs(g) > 1e-4 for g in on["grads"][name])
