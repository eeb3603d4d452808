"""Rank-local adapter parallelism on CPU: 2 gloo ranks over an FSDP2-sharded tiny Llama train the
same per-adapter losses as one process training every adapter with ``GroupedTrainer``, with no
gradient collective at all; once through torch.multiprocessing, once as Ray actors."""
from __future__ import annotations

import os
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
SPAWN_OWNER = {"a": 0, "c": 0, "b": 1}
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


def _spawn_worker(rank: int, world: int, port: int, model_dir: str, data_path: str, out_dir: str) -> None:
    from alto_ray.cluster.ranklocal import RankLocalTrainer, count_collectives, lora_param_count
    from alto_ray.cluster.ranklocal_model import init_rank_process_group, load_sharded_backbone, local_shard_numel

    init_rank_process_group(rank, world, "127.0.0.1", port, "gloo")
    backbone = load_sharded_backbone(model_dir, "cpu", torch.float32)
    trainer = RankLocalTrainer(backbone, DatasetSpec(data_path, eval_size=16), device="cpu",
                               tokenizer=model_dir, eval_size=16)
    for name, owner in SPAWN_OWNER.items():
        if owner == rank:
            trainer.add_adapter(name, _cfg(name))
    losses: Dict[str, List[float]] = {n: [] for n in trainer.adapter_names}
    with count_collectives() as counts:
        for _ in range(STEPS):
            for name, res in trainer.step().items():  # micro_steps agreed by an all-reduce
                losses[name].append(res.loss)
    lora = {n: trainer.adapter_state(n)["lora"] for n in trainer.adapter_names}
    evals = trainer.evaluate()
    with count_collectives() as step_counts:  # the step itself, micro_steps given: not one sync
        trainer.step(micro_steps=2)
    torch.save({"losses": losses, "eval": evals, "agreement_counts": dict(counts),
                "step_counts": dict(step_counts), "names": trainer.adapter_names,
                "lora": lora, "lora_numel": lora_param_count(trainer), "shard_numel": local_shard_numel(backbone),
                "full_numel": sum(p.numel() for p in backbone.parameters()),
                "padding": trainer.padding_micro_steps, "other_missing": _other_missing(trainer, rank)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _other_missing(trainer: Any, rank: int) -> bool:
    """The other rank's adapters have no state here at all."""
    for name, owner in SPAWN_OWNER.items():
        if owner != rank:
            try:
                trainer.adapter_state(name)
                return False
            except KeyError:
                pass
    return True


def test_two_ranks_match_one_process(reference: Dict[str, Any], tiny_model_dir: str, tiny_dataset_path: str,
                                     tmp_path: Any) -> None:
    import torch.multiprocessing as mp

    from alto_ray.cluster.ranklocal_model import free_port

    # spawn, not fork: a forked child of this (OpenMP-initialised) process hangs in gloo/OMP.
    mp.spawn(_spawn_worker, args=(2, free_port(), tiny_model_dir, tiny_dataset_path, str(tmp_path)), nprocs=2)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, out in enumerate(outs):
        mine = sorted(n for n, o in SPAWN_OWNER.items() if o == rank)
        assert sorted(out["names"]) == mine and out["other_missing"]
        assert sorted(out["lora_numel"]) == mine  # adapter weights exist only on their owner
        for name in mine:
            torch.testing.assert_close(torch.tensor(out["losses"][name]),
                                       torch.tensor(reference["losses"][name]), **TOL)
            assert out["eval"][name] == pytest.approx(reference["eval"][name], rel=1e-4)
        # The backbone really is sharded: this rank stores about half of it.
        assert out["shard_numel"] < 0.6 * sum(o["shard_numel"] for o in outs)
        # No gradient sync: FSDP all-gathered the frozen shards but reduced nothing.
        counts = out["step_counts"]
        assert counts.get("all_gather_single", 0) + counts.get("all_gather_into_tensor", 0) > 0
        for op in ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
            assert counts.get(op, 0) == 0, (op, counts)
        assert out["agreement_counts"]["all_reduce"] == STEPS  # the micro-step agreement only
    # Rank 1 has no grad_accum=2 adapter: it padded once per step to stay in lock-step.
    assert outs[1]["padding"] == STEPS + 1 and outs[0]["padding"] == 0
    # The trained weights equal the single-process ones: an averaged gradient would have moved them.
    for rank, out in enumerate(outs):
        for name, weights in out["lora"].items():
            torch.testing.assert_close(weights, reference["lora"][name], **TOL)


def test_ray_group_routes_steps_and_pads_empty_rank(reference: Dict[str, Any], tiny_model_dir: str,
                                                    tiny_dataset_path: str, tmp_path: Any) -> None:
    ray = pytest.importorskip("ray")
    from alto_ray.cluster.ranklocal_ray import RankLocalGroup

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    group = None
    try:
        group = RankLocalGroup(tiny_model_dir, DatasetSpec(tiny_dataset_path, eval_size=16), num_ranks=2,
                               use_gpu=False, trainer_kwargs={"eval_size": 16})
        ranks = {name: group.add_adapter(name, _cfg(name)) for name in CONFIGS}
        # Least-loaded routing by tokens per step: a -> 0, b -> 1, c (accum 2) -> 0 (load 512 < 768).
        assert ranks == {"a": 0, "b": 1, "c": 0}
        losses: Dict[str, List[float]] = {n: [] for n in CONFIGS}
        for _ in range(STEPS):
            results, counts = group.step_with_stats(count_collectives=True)
            for name, res in results.items():
                losses[name].append(res.loss)
            for c in counts:
                assert c["all_reduce"] == 0 and c.get("reduce_scatter_single", 0) == 0
                assert c.get("reduce_scatter_tensor", 0) == 0
        for name in CONFIGS:
            torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(reference["losses"][name]), **TOL)
        evals = group.evaluate()
        assert evals == pytest.approx(reference["eval"], rel=1e-4)
        state = group.adapter_state("b")
        torch.testing.assert_close(state["lora"], reference["lora"]["b"], **TOL)
        info = group.info()
        assert sorted(info[0]["lora_numel"]) == ["a", "c"] and sorted(info[1]["lora_numel"]) == ["b"]
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
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
