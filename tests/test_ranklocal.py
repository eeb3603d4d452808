"""Rank-local adapter parallelism on CPU: 2 gloo ranks (Ray actors) over an FSDP2-sharded tiny Llama
train the same per-adapter losses, eval losses and weights as one process training every adapter
with ``GroupedTrainer``, with no gradient collective at all. (The torchrun path without Ray is
exercised by ``benchmarks/multigpu.py --smoke``; one multi-process launch keeps this file fast.)"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer

STEPS = 3
# Differing ranks, seeds, learning rates and grad_accum (c needs 2 packed passes per step, so
# the rank without it must pad to stay in lock-step). Dropout 0: exact comparison.
CONFIGS = {
    "a": dict(rank=4, alpha=8, lr=2e-3, seed=1, batch_size=2, max_steps=10),
    "b": dict(rank=8, alpha=8, lr=1e-3, seed=2, batch_size=3, max_steps=10),
    "c": dict(rank=4, alpha=4, lr=3e-3, seed=3, batch_size=2, max_steps=10, grad_accum=2),
}
TOL = dict(rtol=1e-4, atol=1e-5)


def _cfg(name: str) -> AdapterConfig:
    return AdapterConfig(dropout=0.0, lr_schedule="constant", **CONFIGS[name])


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, tiny_dataset_path: str) -> Dict[str, Any]:
    """One process, every adapter in one GroupedTrainer: the numbers to match."""
    torch.manual_seed(0)
    trainer = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path, eval_size=16), device="cpu",
                             eval_size=16)
    for name in CONFIGS:
        trainer.add_adapter(name, _cfg(name))
    losses: Dict[str, List[float]] = {n: [] for n in CONFIGS}
    for _ in range(STEPS):
        for name, res in trainer.step().items():
            losses[name].append(res.loss)
    return {"losses": losses, "eval": trainer.evaluate(),
            "lora": {n: trainer.adapter_state(n)["lora"] for n in CONFIGS}}


def test_ray_group_routes_steps_and_pads_empty_rank(reference: Dict[str, Any], tiny_model_dir: str,
                                                    tiny_dataset_path: str, tmp_path: Any) -> None:
    ray = pytest.importorskip("ray")
    from alto_ray.cluster.ranklocal_ray import RankLocalGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    group = None
    try:
        group = RankLocalGroup(tiny_model_dir, DatasetSpec(tiny_dataset_path, eval_size=16), num_ranks=2,
                               use_gpu=False, trainer_kwargs={"eval_size": 16})
        ranks = {name: group.add_adapter(name, _cfg(name)) for name in CONFIGS}
        # Least-loaded routing by tokens per step: a -> 0, b -> 1, c (accum 2) -> 0 (load 512 < 768).
        assert ranks == {"a": 0, "b": 1, "c": 0}
        # The backbone really is sharded: each rank stores about half of it.
        shards = [info["shard_numel"] for info in group.rank_info]
        assert max(shards) < 0.6 * sum(shards)
        losses: Dict[str, List[float]] = {n: [] for n in CONFIGS}
        for step in range(STEPS):
            if step == 0:  # micro_steps agreed by the ranks themselves (one all-reduce), as under torchrun
                outs = ray.get([w.step.remote(None, True) for w in group.workers])
                results = {k: v for out in outs for k, v in out["results"].items()}
                assert all(out["collectives"]["all_reduce"] == 1 for out in outs)
            else:  # micro_steps from the driver: not a single reduction of any kind
                results, counts = group.step_with_stats(count_collectives=True)
                for c in counts:
                    assert c.get("all_gather_single", 0) + c.get("all_gather_into_tensor", 0) > 0, c
                    for op in ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
                        assert c.get(op, 0) == 0, (op, c)
            for name, res in results.items():
                losses[name].append(res.loss)
        for name in CONFIGS:
            torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(reference["losses"][name]), **TOL)
            # The trained weights equal the single-process ones: an averaged gradient would differ.
            torch.testing.assert_close(group.adapter_state(name)["lora"], reference["lora"][name], **TOL)
        assert group.evaluate() == pytest.approx(reference["eval"], rel=1e-4)
        # Adapters that do not fit one eval forward together (a small token budget): rank 0 (a, c)
        # then runs twice rank 1's forwards, and rank 1 pads to that count (or the gathers hang).
        ray.get([w.__ray_call__.remote(lambda w: setattr(w.trainer.trainer, "eval_token_budget", 1))
                 for w in group.workers])
        passes = ray.get([w.eval_passes.remote(None) for w in group.workers])
        assert passes[0] == 2 * passes[1] > 0
        assert group.evaluate() == pytest.approx(reference["eval"], rel=1e-4)
        # Each adapter's weights exist only on its rank; rank 1 (no grad_accum=2 adapter) padded
        # one micro-step per step to keep the all-gathers in lock-step.
        info = group.info()
        assert sorted(info[0]["lora_numel"]) == ["a", "c"] and sorted(info[1]["lora_numel"]) == ["b"]
        assert info[1]["padding_micro_steps"] == STEPS and info[0]["padding_micro_steps"] == 0
        state = group.adapter_state("b")
        group.save_adapter("a", str(tmp_path / "a"))
        assert (tmp_path / "a" / "adapter_config.json").exists()
        # Rank 1 empties: the next steps must not hang (it pads through the all-gathers).
        group.remove_adapter("b")
        for _ in range(2):
            assert set(group.step()) == {"a", "c"}
        assert set(group.evaluate()) == {"a", "c"}
        # Resume b elsewhere from its state: routed to the now-empty rank 1.
        assert group.add_adapter("b", _cfg("b"), state=state) == 1
        assert set(group.step()) == {"a", "b", "c"}
        assert group.adapter_state("b")["step"] == STEPS + 1 and group.placement == {"a": 0, "c": 0, "b": 1}
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


SHARDED_FUSED_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
import alto_kernels.fused_linear as fused_linear
from alto_ray.cluster.ranklocal import RankLocalTrainer
from alto_ray.cluster.ranklocal_model import free_port, init_rank_process_group, load_sharded_backbone
from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from alto_ray.engine.fused_modules import FusedGatedMLP, FusedRMSNorm
model_dir, data_path = sys.argv[1], sys.argv[2]
calls = [0]
_apply_linear = fused_linear.apply_linear_multi_lora
def counted(*a, **k):
    calls[0] += 1
    return _apply_linear(*a, **k)
fused_linear.apply_linear_multi_lora = counted
import alto_kernels.sibling_linear as sibling_linear
_apply_siblings = sibling_linear.apply_sibling_linears_multi_lora
def counted_siblings(plans, *a, **k):  # q/k/v and gate/up: one node for the linears of a group
    calls[0] += len(plans)
    return _apply_siblings(plans, *a, **k)
sibling_linear.apply_sibling_linears_multi_lora = counted_siblings
CFGS = {"a": AdapterConfig(rank=4, alpha=8, lr=1e-2, batch_size=2, max_seq_len=12, seed=1, lr_schedule="constant"),
        "b": AdapterConfig(rank=8, alpha=8, lr=1e-2, batch_size=1, max_seq_len=12, seed=2, lr_schedule="constant")}
def train(t):
    for n, c in CFGS.items():
        t.add_adapter(n, c)
    with torch.no_grad():  # B starts at zero: nudge it so that the LoRA deltas and dA count
        gen = torch.Generator().manual_seed(5)
        inner = t.trainer if isinstance(t, RankLocalTrainer) else t
        for w in inner.model.adapters.values():
            for _, a, b in w.lora_pairs():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    losses = {n: [] for n in CFGS}
    for _ in range(3):
        for n, r in t.step().items():
            losses[n].append(r.loss)
    return losses, t.evaluate()
init_rank_process_group(0, 1, "127.0.0.1", free_port(), "gloo", "cpu")
rl = RankLocalTrainer(load_sharded_backbone(model_dir, "cpu", torch.float32), DatasetSpec(data_path, eval_size=8),
                      device="cpu", backend="triton", eval_size=8)
m = rl.trainer.model
out = {"sharded_weight": type(m.backbone.get_decoder().layers[0].self_attn.q_proj.base.weight.data).__name__,
       "norms": m.fused_norms, "mlps": m.fused_mlps, "layers": len(m.backbone.get_decoder().layers),
       "norm_sources": sum(isinstance(x, FusedRMSNorm) and x.source is not None for x in m.backbone.modules()),
       "mlp_modules": sum(isinstance(x, FusedGatedMLP) for x in m.backbone.modules())}
out["sharded"], out["sharded_eval"] = train(rl)
out["sharded_linear_calls"], calls[0] = calls[0], 0
out["plain"], out["plain_eval"] = train(GroupedTrainer(model_dir, DatasetSpec(data_path, eval_size=8), device="cpu",
                                                       backend="triton", eval_size=8))
out["plain_linear_calls"] = calls[0]
print(json.dumps(out))
"""


def test_sharded_backbone_keeps_the_fused_modules_and_one_node_linears(tiny_model_dir: str, tiny_dataset_path: str,
                                                                       interpreted_triton_env: dict) -> None:
    """FSDP2 shards (DTensors) are gathered onto their modules only inside each unit's forward:
    the fused norms, gated MLPs and one-node linears must read the gathered weights there, in the
    backward too (after FSDP freed and re-gathered them), and train what an unsharded backbone
    trains (one gloo rank, Triton interpreted; the norm and SwiGLU use their CPU formula, which
    is the module's own bit for bit)."""
    proc = subprocess.run([sys.executable, "-c", SHARDED_FUSED_SCRIPT, tiny_model_dir, tiny_dataset_path],
                          env=interpreted_triton_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    layers = res["layers"]
    assert res["sharded_weight"] == "DTensor"
    assert res["norms"] == res["norm_sources"] == 2 * layers + 1 and res["mlps"] == res["mlp_modules"] == layers
    # Every linear of every step's forward in a one-node path, sharded or not (7 per layer, 3 steps;
    # q/k/v and gate/up in their sibling nodes).
    assert res["sharded_linear_calls"] == res["plain_linear_calls"] >= 3 * 7 * layers
    for name in ("a", "b"):
        assert res["sharded"][name] == pytest.approx(res["plain"][name], rel=1e-5, abs=1e-6)
        assert res["sharded"][name][-1] != res["sharded"][name][0]
    assert res["sharded_eval"] == pytest.approx(res["plain_eval"], rel=1e-5)
