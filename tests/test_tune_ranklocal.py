"""Tune trials on a rank-local group: `LoRATask(gpus_per_group=2)` on a real local Ray cluster (CPU,
2 gloo ranks over an FSDP2-sharded tiny Llama, each adapter on one rank).

Covers: bad settings fail on the driver before any group or placement group exists; a Tune sweep
trains every trial to the losses of the single-process `GroupedTrainer` (dropout 0), spread over
both ranks; a trial stopped early frees its group slot for the queued one; checkpoints load with
`PeftModel.from_pretrained`; the idle group gives its ranks' resources back; the coordinator's
two-bundle grant runs a rank-local group inside that placement group; a rank lost mid-run ends its
group at once and the trials resume from their checkpoints on a new one.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Set

import pytest

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402

from alto_ray.tune.group import NAMESPACE  # noqa: E402
from alto_ray.tune.task import RANK_LOCAL_TRAINER, LoRATask  # noqa: E402
from alto_ray.tune.trainable import lora_trainable  # noqa: E402
from tune_support import Recorder, close, load_peft_checkpoint, local_ray, reference_losses  # noqa: E402

BASE = {"alpha": 8, "batch_size": 2, "dropout": 0.0}
LRS = [3e-3, 1e-2, 5e-3]
MAX_STEPS = 6
STOP_AT = 2  # the first trial to report this step is stopped (Tune's own early stop)


def _rank(spec: Any) -> int:
    return 8 if spec.config.lr == 1e-2 else 4


def _accum(spec: Any) -> int:  # one trial needs 2 packed passes per step: the other rank pads
    return 2 if spec.config.lr == 5e-3 else 1


@pytest.fixture(scope="module")
def cluster() -> Any:
    with local_ray():
        yield


def _task(model: str, data: str, name: str, **kw: Any) -> LoRATask:
    # run_ahead=0 (lock-step): with 6 steps a trial, a group training ahead could finish the
    # survivor before the stopped trial's slot is refilled, and the backfill check needs both.
    return LoRATask(model=model, dataset=data, name=name, max_steps=MAX_STEPS, eval_every=3, eval_size=8,
                    max_seq_len=32, device="cpu", idle_timeout_s=3.0, gpus_per_group=2, run_ahead=0, **kw)


def _wait_all_cpus_free(timeout_s: float = 60.0) -> bool:
    total = ray.cluster_resources()["CPU"]
    end = time.time() + timeout_s
    while time.time() < end:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            return True
        time.sleep(0.5)
    return False


class _FirstAtStep(tune.stopper.Stopper):
    """Stops the first trial that reports `step`: an early stop whose slot a queued trial needs."""

    def __init__(self, step: int) -> None:
        self.step, self.victim = step, None

    def __call__(self, trial_id: str, result: Dict[str, Any]) -> bool:
        if self.victim is None and result.get("step", 0) >= self.step and not result.get("done"):
            self.victim = trial_id
        return trial_id == self.victim

    def stop_all(self) -> bool:
        return False


class _GroupProbe(tune.Callback):
    """After each result: which rank holds each adapter, and what the group runs on."""

    def __init__(self) -> None:
        self.ranks: Dict[str, Set[int]] = {}
        self.info: Dict[str, Any] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        actor = ray.get_actor(result["alto_group"], namespace=NAMESPACE)
        placement, info = ray.get(actor.__ray_call__.remote(lambda self: (self.trainer.placement, {
            "trainer": type(self.trainer).__name__, "device": self.device, "gpu_ids": ray.get_gpu_ids(),
            "where": self._where(),
            "pg": self.trainer.placement_group.id.hex(), "ranks": self.trainer.num_ranks,
            "own_pg": ray.get_runtime_context().get_placement_group_id(),
            "shards": [r["shard_numel"] for r in self.trainer.rank_info]})))
        for name, rank in placement.items():
            self.ranks.setdefault(name, set()).add(rank)
        self.info = info


def test_bad_settings_fail_on_the_driver_before_anything_starts(cluster, tiny_model_dir, tiny_dataset_path) -> None:
    before = dict(ray.util.placement_group_table())
    cases = [(dict(gpus_per_group=0), r"LoRATask\.gpus_per_group: must be a positive integer"),
             (dict(gpus_per_group=8), r"LoRATask\.gpus_per_group: one group is 8 ranks .* no node"),
             (dict(gpus_per_group=2, device="cuda"), r"LoRATask\.gpus_per_group: .*'GPU': 1\.0"),
             (dict(gpus_per_group=2, group_resources={"CPU": 1, "GPU": 2}), r"LoRATask\.group_resources"),
             (dict(gpus_per_group=2, num_groups=3), r"LoRATask\.num_groups: 3 groups .* holds 2")]
    for kw, match in cases:
        task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="bad", **kw)
        with pytest.raises(ValueError, match=match):
            lora_trainable(task)
    assert ray.util.placement_group_table() == before
    # A valid task is planned as rank-local groups, the group process itself taking no resources.
    (spec,) = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="ok", gpus_per_group=2).group_specs()
    assert spec.trainer == RANK_LOCAL_TRAINER and spec.resources == {"CPU": 0.0}
    assert spec.trainer_kwargs == {"num_ranks": 2, "use_gpu": False, "cpus_per_rank": 0.5}


@pytest.fixture(scope="module")
def sweep(cluster, tiny_model_dir, tiny_dataset_path, tmp_path_factory) -> Dict[str, Any]:
    task = _task(tiny_model_dir, tiny_dataset_path, "ranklocal-sweep", max_adapters_per_group=2)
    rec, probe, stopper = Recorder(), _GroupProbe(), _FirstAtStep(STOP_AT)
    t0 = time.time()
    grid = tune.Tuner(
        lora_trainable(task),
        param_space={**BASE, "lr": tune.grid_search(LRS), "rank": tune.sample_from(_rank),
                     "grad_accum": tune.sample_from(_accum)},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(name="ranklocal", storage_path=str(tmp_path_factory.mktemp("rl")), verbose=0,
                                  stop=stopper, callbacks=[rec, probe])).fit()
    return {"task": task, "grid": grid, "rec": rec, "probe": probe, "victim": stopper.victim,
            "seconds": time.time() - t0}


def test_sweep_matches_the_single_process_reference_on_both_ranks(sweep) -> None:
    grid, rec, probe = sweep["grid"], sweep["rec"], sweep["probe"]
    assert grid.num_errors == 0 and len(grid) == 3
    assert probe.info["trainer"] == "RankLocalGroup" and probe.info["ranks"] == 2
    assert probe.info["where"] == "2 ranks: cpu cpu"  # what the dashboard's actor name shows
    assert probe.info["device"] == "cpu" and probe.info["gpu_ids"] == []      # the group process holds no device
    shards = probe.info["shards"]
    assert max(shards) < 0.6 * sum(shards)                                    # the backbone really is sharded
    assert set().union(*probe.ranks.values()) == {0, 1}                       # adapters on both ranks
    results = {r.config["lr"]: r for r in grid}
    configs = [{**BASE, "lr": lr, "rank": 8 if lr == 1e-2 else 4, "grad_accum": 2 if lr == 5e-3 else 1}
               for lr in LRS]
    ref = reference_losses(sweep["task"], configs, MAX_STEPS)
    losses = rec.losses()
    for i, lr in enumerate(LRS):
        got = losses[results[lr].metrics["trial_id"]]
        assert sorted(got) == list(range(1, len(got) + 1))
        assert all(close(got[s + 1], ref[i][s]) for s in range(len(got))), (lr, got, ref[i])


def test_early_stop_frees_the_slot_for_the_queued_trial(sweep) -> None:
    grid, rec, victim = sweep["grid"], sweep["rec"], sweep["victim"]
    by_id = {r.metrics["trial_id"]: r for r in grid}
    assert victim is not None and by_id[victim].metrics["step"] == STOP_AT
    first = {}
    for row in rec.rows:
        first.setdefault(row["trial"], row)
    # Max 2 adapters: the trial that reported last waited for a slot. (Not the longest
    # queue_wait_s: the first trial to join also waits, while the group's ranks start.)
    queued = max(first, key=lambda t: first[t]["t"])
    assert queued != victim and first[queued]["queue_wait_s"] > 0
    victim_last = max(row["t"] for row in rec.rows if row["trial"] == victim)
    assert first[queued]["t"] >= victim_last      # admitted only once the stopped trial left,
    assert first[queued]["active"] == 2           # beside the survivor: not when that one finished
    assert all(r.metrics["step"] == MAX_STEPS for t, r in by_id.items() if t != victim)
    assert max(row["active"] for row in rec.rows) == 2


def test_checkpoint_is_a_peft_adapter_and_the_idle_group_frees_its_ranks(sweep, tiny_model_dir) -> None:
    best = sweep["grid"].get_best_result(metric="eval_loss", mode="min", scope="last")
    path = best.checkpoint.path
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= set(os.listdir(path))
    rank, changes = load_peft_checkpoint(tiny_model_dir, path)
    assert rank == best.config["rank"] and changes
    # idle_timeout_s after the last trial: the group exits, and with it its ranks and their bundles.
    assert _wait_all_cpus_free()
    table = ray.util.placement_group_table()
    assert table[sweep["probe"].info["pg"]]["state"] == "REMOVED"


def test_coordinator_grant_of_two_bundles_runs_a_rank_local_group(cluster, tiny_model_dir, tiny_dataset_path,
                                                                 tmp_path) -> None:
    from alto_ray.cluster.tenant import run_tenant

    assert _wait_all_cpus_free()
    task = _task(tiny_model_dir, tiny_dataset_path, "ranklocal-tenant")
    probe, rec, tenants = _GroupProbe(), Recorder(), []
    grid = run_tenant(task, {**BASE, "rank": 4, "lr": tune.grid_search(LRS[:2])},
                      tune.TuneConfig(metric="loss", mode="min"),
                      tune.RunConfig(name="tenant", storage_path=str(tmp_path), verbose=0, callbacks=[probe, rec]),
                      on_tenant=tenants.append, poll_s=0.5,
                      coordinator_options={"state_path": str(tmp_path / "coord.json"), "time_limit_s": 1.0})
    assert grid.num_errors == 0 and all(r.metrics["step"] == MAX_STEPS for r in grid)
    (grant,) = tenants[0].grants
    assert len(grant.bundles) == 2 and grant.bundles[0] == {"CPU": 0.5}
    pg = grant.placement_group.id.hex()
    assert probe.info["own_pg"] == pg and probe.info["pg"] == pg      # group and ranks in the granted bundles
    assert probe.info["trainer"] == "RankLocalGroup" and set().union(*probe.ranks.values()) == {0, 1}
    ref = reference_losses(task, [{**BASE, "rank": 4, "lr": lr} for lr in LRS[:2]], MAX_STEPS)
    losses = rec.losses()
    for i, lr in enumerate(LRS[:2]):
        (r,) = [r for r in grid if r.config["lr"] == lr]
        got = losses[r.metrics["trial_id"]]
        assert all(close(got[s + 1], ref[i][s]) for s in range(MAX_STEPS)), (lr, got, ref[i])


def test_a_lost_rank_ends_the_group_and_its_trials_resume_from_checkpoints(cluster, tiny_model_dir,
                                                                           tiny_dataset_path, tmp_path) -> None:
    # A rank that dies mid-run (OOM-killed, node lost) leaves the other ranks in a collective it
    # will never join: the group must not wait for the process group's timeout. It kills its
    # ranks and exits; Tune retries the trials, which resume from their checkpoints on a new group.
    from tune_support import contiguous_resume

    assert _wait_all_cpus_free()
    task = _task(tiny_model_dir, tiny_dataset_path, "ranklocal-lost", checkpoint_every=2)
    killed: list = []

    def kill_rank_1(trial: Any, result: Dict[str, Any]) -> None:
        if not killed and result["step"] == 3:
            group = ray.get_actor(result["alto_group"], namespace=NAMESPACE)
            worker = ray.get(group.__ray_call__.remote(lambda self: self.trainer.workers[1]))
            ray.kill(worker)
            killed.append(time.time())

    rec = Recorder(on_result=kill_rank_1)
    lrs = LRS[:2]
    t0 = time.time()
    grid = tune.Tuner(
        lora_trainable(task), param_space={**BASE, "rank": 4, "lr": tune.grid_search(lrs)},
        tune_config=tune.TuneConfig(metric="loss", mode="min"),
        run_config=tune.RunConfig(name="lost", storage_path=str(tmp_path), verbose=0, callbacks=[rec],
                                  failure_config=tune.FailureConfig(max_failures=2))).fit()
    assert killed, "no trial reached step 3"
    assert time.time() - t0 < 240  # not the process group's 600 s timeout
    assert grid.num_errors == 0 and all(r.metrics["step"] == MAX_STEPS for r in grid)
    assert rec.recovered  # Tune restarted the trials of the lost group
    ref = reference_losses(task, [{**BASE, "rank": 4, "lr": lr} for lr in lrs], MAX_STEPS)
    losses, steps = rec.losses(), rec.steps()
    for i, r in enumerate(sorted(grid, key=lambda r: lrs.index(r.config["lr"]))):
        tid = r.metrics["trial_id"]
        assert contiguous_resume(steps[tid], task.checkpoint_interval), steps[tid]
        assert all(close(losses[tid][s + 1], ref[i][s]) for s in range(MAX_STEPS)), (losses[tid], ref[i])
