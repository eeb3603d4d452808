"""The engine through the fused Triton kernel (interpreted on the CPU) gives the reference's numbers.

Runs in a subprocess: TRITON_INTERPRET must be set before triton is first imported.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
model_dir, data_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
import alto_kernels.fused_linear as fused_linear
linear_calls = [0]
_apply_linear = fused_linear.apply_linear_multi_lora
def counted(*a, **k):
    linear_calls[0] += 1
    return _apply_linear(*a, **k)
fused_linear.apply_linear_multi_lora = counted
out = {}
for backend in ("reference", "triton"):
    t = GroupedTrainer(model_dir, DatasetSpec(data_path), device="cpu", backend=backend)
    if mode == "subsets":
        # a: every module; b: q_proj only (subset rows -> split runs); c: dropout drawn in-kernel
        t.add_adapter("a", AdapterConfig(rank=4, lr=1e-2, batch_size=2, max_seq_len=12, seed=1))
        t.add_adapter("b", AdapterConfig(rank=8, lr=1e-2, batch_size=1, max_seq_len=12, seed=2, target_modules=("q_proj",)))
        t.add_adapter("c", AdapterConfig(rank=2, lr=1e-2, batch_size=1, max_seq_len=12, seed=3, dropout=0.3,
                                         target_modules=("v_proj", "down_proj")))
    else:  # every adapter in every module: each layer's rows are all adapters' (one node per linear)
        t.add_adapter("a", AdapterConfig(rank=4, lr=1e-2, batch_size=2, max_seq_len=12, seed=1))
        t.add_adapter("b", AdapterConfig(rank=8, lr=1e-2, batch_size=1, max_seq_len=12, seed=2))
        t.add_adapter("c", AdapterConfig(rank=2, lr=1e-2, batch_size=1, max_seq_len=12, seed=3, dropout=0.3))
    grads = {}
    with torch.no_grad():  # B starts at zero; nudge it so the delta and dA are not trivially 0
        gen = torch.Generator().manual_seed(5)
        for n, w in t.model.adapters.items():
            for e, a, b in w.lora_pairs():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    # The gradient each optimizer step sees (before clipping): autograd's on the reference path,
    # the kernels' gradient sink (master.grad written in place) on the fused path.
    step_fn = t._optimizer_step
    t._optimizer_step = lambda run, lr, norm: (grads.__setitem__(run.name, run.weights.master.grad.tolist()),
                                               step_fn(run, lr, norm))
    steps = [{k: [v.loss, v.finite] for k, v in t.step().items()}]
    steps.append({k: [v.loss, v.finite] for k, v in t.step().items()})  # the sinks were zeroed in place
    from alto_kernels import fused_cross_entropy, fused_rotary  # through their kernels on the fused path only
    out[backend] = {"steps": steps, "grads": grads, "rotary_launches": sum(fused_rotary._LAUNCH.launches.values()),
                    "ce_launches": sum(fused_cross_entropy._FWD.launches.values()),
                    "fused_rotary": t.model.fused_rotary, "linear_calls": linear_calls[0]}
    linear_calls[0] = 0
# The engine's isolation guarantee rests on the kernel: a NaN/inf adapter must not touch others' rows.
import alto_kernels
torch.manual_seed(0)
x = torch.randn(10, 16, requires_grad=True)
A = [torch.randn(4, 16), torch.full((2, 16), float("nan")), torch.randn(8, 16)]
B = [torch.randn(8, 4), torch.full((8, 2), float("inf")), torch.randn(8, 8)]
for w in A + B:
    w.requires_grad_()
y = alto_kernels.multi_lora(x, torch.zeros(10, 8), A, B, [0, 3, 6, 10], [1.0, 1.0, 1.0], backend="triton")
y.sum().backward()
out["isolated"] = all(bool(t.isfinite().all()) for t in (y[:3], y[6:], x.grad[:3], x.grad[6:], A[0].grad,
                                                         A[2].grad, B[0].grad, B[2].grad))
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["subsets", "all"])
def test_fused_backend_matches_reference(tiny_model_dir, tiny_dataset_path, interpreted_triton_env, mode):
    # The token loss: by default through alto_kernels.cross_entropy (gradient over the logits);
    # "all" also checks the switch back to F.cross_entropy (ALTO_FUSED_CE=0) on the fused backend.
    env = {k: v for k, v in interpreted_triton_env.items() if k != "ALTO_FUSED_CE"}
    if mode == "all":
        env["ALTO_FUSED_CE"] = "0"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir, tiny_dataset_path, mode],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["isolated"], "a non-finite adapter leaked into another adapter's rows in the fused kernel"
    for step_ref, step_tri in zip(res["reference"]["steps"], res["triton"]["steps"]):
        for name in ("a", "b"):
            assert step_tri[name][1] and step_tri[name][0] == pytest.approx(step_ref[name][0], rel=1e-4, abs=1e-5)
        # c's dropout masks come from different RNGs (torch vs in-kernel Philox): close, not equal
        assert step_tri["c"][1] and abs(step_tri["c"][0] - step_ref["c"][0]) < 0.5
    # The base GEMM joins the LoRA node where one run covers a linear's rows: never with subsets
    # here (c's rows sit between runs, or the layer is only a's), in every linear with "all".
    assert res["reference"]["linear_calls"] == 0
    assert (res["triton"]["linear_calls"] > 0) == (mode == "all")
    layers = res["triton"]["fused_rotary"]
    assert layers > 0 and res["reference"]["rotary_launches"] == 0
    assert res["triton"]["rotary_launches"] >= 2 * 2 * 2 * layers  # q and k, forward and backward, 2 steps
    assert res["reference"]["ce_launches"] == 0
    if mode == "all":
        assert res["triton"]["ce_launches"] == 0
    else:
        assert res["triton"]["ce_launches"] >= 2  # one loss per step
    for name in ("a", "b"):
        assert res["triton"]["grads"][name] == pytest.approx(res["reference"]["grads"][name], rel=1e-3, abs=1e-6)
        assert any(abs(g) > 1e-4 for g in res["triton"]["grads"][name])
