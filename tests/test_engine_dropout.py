"""Dropout leaves no trace across adapters: an adapter's losses with dropout > 0 are the same
trained alone, beside an adapter that joined first (another position, wider sequences), or
joining a group mid-run; on the reference path and through the fused kernels (interpreted).

Runs in a subprocess: TRITON_INTERPRET must be set before triton is first imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
model_dir, data_path, backends = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
X = dict(rank=4, alpha=8, lr=5e-2, batch_size=2, max_seq_len=12, dropout=0.3)
W = dict(rank=8, alpha=16, lr=1e-2, batch_size=3, max_seq_len=40, dropout=0.1, seed=9)

def add(t, name, cfg):
    t.add_adapter(name, AdapterConfig(**cfg))
    with torch.no_grad():  # B starts at zero: nudge it so that the masks show in the first loss
        gen = torch.Generator().manual_seed(len(name) * 7 + int(cfg.get("seed", 0)))
        for e, a, b in t.model.adapters[name].lora_pairs():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)

def run(backend, plan, seed=7, steps=3):
    t = GroupedTrainer(model_dir, DatasetSpec(data_path), device="cpu", backend=backend)
    if plan in ("beside", "joins"):
        add(t, "w", W)
    if plan == "joins":
        t.step()
    add(t, "x", dict(X, seed=seed))
    return [t.step()["x"].loss for _ in range(steps)]

out = {}
for backend in backends:
    out[backend] = {plan: run(backend, plan) for plan in ("alone", "beside", "joins")}
    out[backend]["other_seed"] = run(backend, "alone", seed=8)
print(json.dumps(out))
"""


def _run(tiny_model_dir, tiny_dataset_path, backends, env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir, tiny_dataset_path, backends], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(res):
    alone = res["alone"]
    for plan in ("beside", "joins"):
        assert res[plan] == pytest.approx(alone, rel=2e-5, abs=1e-6), (plan, res[plan], alone)
    # the masks matter: another seed (other masks, other data order) gives other losses
    assert max(abs(a - b) for a, b in zip(res["other_seed"], alone)) > 1e-3


def test_reference_path_dropout_is_the_adapters_own(tiny_model_dir, tiny_dataset_path):
    res = _run(tiny_model_dir, tiny_dataset_path, "reference", dict(os.environ, OMP_NUM_THREADS="1"))
    _check(res["reference"])


def test_fused_path_dropout_is_the_adapters_own(tiny_model_dir, tiny_dataset_path, interpreted_triton_env):
    _check(_run(tiny_model_dir, tiny_dataset_path, "triton", interpreted_triton_env)["triton"])
