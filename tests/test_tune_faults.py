"""Backfill, group loss, PAUSE/resume and Tuner.restore, on a real local Ray cluster (CPU).

Dropout is 0 so every resume is bit-for-bit the uninterrupted run: losses are compared with the
same adapters trained in-process by one GroupedTrainer.
"""
from __future__ import annotations

import pytest
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from alto_ray.tune.task import LoRATask
from alto_ray.tune.trainable import lora_trainable
from tune_support import Recorder, close, contiguous_resume, reference_losses

BASE = {"rank": 4, "alpha": 8, "batch_size": 2, "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_task(model: str, data: str, **kw) -> LoRATask:
    """One task for the whole module, so its groups (and loaded backbone) carry over between
    tests: every test that does not kill a group reuses g0. Only placement (`num_groups`) and
    trainable-side settings (`checkpoint_every`) vary; those are read by trials, not groups."""
    args = dict(model=model, dataset=data, max_steps=8, eval_every=4, checkpoint_every=2, eval_size=8,
                max_seq_len=48, name="faults", idle_timeout_s=120.0, max_adapters_per_group=2,
                group_resources={"CPU": 0.5})
    args.update(kw)
    return LoRATask(**args)


def run(task: LoRATask, space: dict, tmp_path, name: str, **kw) -> tuple:
    rec = kw.pop("recorder", None) or Recorder()
    failure = tune.FailureConfig(max_failures=kw.pop("max_failures", 0))
    tuner = tune.Tuner(
        lora_trainable(task), param_space=space,
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=kw.pop("scheduler", None),
                                    reuse_actors=kw.pop("reuse_actors", False),
                                    max_concurrent_trials=kw.pop("max_concurrent_trials", None)),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), callbacks=[rec], verbose=0,
                                  failure_config=failure, stop=kw.pop("stop", None)))
    return tuner.fit(), rec


def by_lr(grid) -> dict:
    return {r.config["lr"]: r for r in grid}


def test_backfill_admits_a_queued_trial_when_one_stops(tiny_model_dir, tiny_dataset_path, tmp_path):
    task = make_task(tiny_model_dir, tiny_dataset_path)
    lrs = [1e-3, 2e-3, 3e-3, 4e-3]
    stopped = []

    def stop_one(trial_id, result):  # the first trial to reach step 2 while others wait
        if not stopped and result["step"] == 2 and result["alto_queued"] > 0:
            stopped.append(trial_id)
        return trial_id in stopped

    grid, rec = run(task, {**BASE, "lr": tune.grid_search(lrs)}, tmp_path, "backfill", stop=stop_one)
    assert all(r.error is None for r in grid) and len(stopped) == 1
    assert max(row["active"] for row in rec.rows) <= 2  # never more than the cap
    first = {}
    for row in rec.rows:
        first.setdefault(row["trial"], row)
    order = sorted(first, key=lambda t: first[t]["t"])  # by first result
    assert stopped[0] in order[:2]
    assert first[order[2]]["queue_wait_s"] > 0.1 and first[order[3]]["queue_wait_s"] > 0.1
    # The first queued trial starts while the other trial of the first pair still trains: the
    # stopped trial's slot was reused at once, not when the group drained.
    other = order[1] if order[0] == stopped[0] else order[0]
    other_end = max(row["t"] for row in rec.rows if row["trial"] == other)
    assert first[order[2]]["t"] < other_end
    steps = {r.metrics["trial_id"]: r.metrics["step"] for r in grid}
    assert steps.pop(stopped[0]) == 2 and set(steps.values()) == {task.max_steps}


def test_killed_group_fails_over_from_checkpoints(tiny_model_dir, tiny_dataset_path, tmp_path):
    task = make_task(tiny_model_dir, tiny_dataset_path, num_groups=2)
    lrs = [1e-3, 2e-3, 3e-3, 4e-3]
    killed = []

    def kill_g0(trial, result):
        if not killed and result["alto_group"] == "alto:faults:g0" and result["step"] == 5:
            killed.append(result["trial_id"])
            ray.kill(ray.get_actor("alto:faults:g0", namespace="alto"))

    rec = Recorder(on_result=kill_g0)
    grid, rec = run(task, {**BASE, "lr": tune.grid_search(lrs)}, tmp_path, "kill", recorder=rec, max_failures=2)
    assert killed, "the test never saw g0 reach step 5"
    groups = {}
    for row in rec.rows:
        groups.setdefault(row["trial"], row["group"])
    assert set(groups.values()) == {"alto:faults:g0", "alto:faults:g1"}  # trials spread over both groups
    in_g0 = {t for t, g in groups.items() if g == "alto:faults:g0"}
    assert rec.recovered and rec.recovered <= in_g0  # only the killed group's trials noticed
    assert all(r.error is None and r.metrics["step"] == task.max_steps for r in grid)
    for trial, steps in rec.steps().items():
        assert contiguous_resume(steps, task.checkpoint_interval), (trial, steps)
    ref = reference_losses(task, [{**BASE, "lr": lr} for lr in lrs], task.max_steps)
    losses = rec.losses()
    for i, lr in enumerate(lrs):
        tid = by_lr(grid)[lr].metrics["trial_id"]
        assert all(close(losses[tid][s + 1], ref[i][s]) for s in range(task.max_steps)), (lr, losses[tid], ref[i])


class PauseOnce(FIFOScheduler):
    """Pauses each trial once at `at`; FIFO brings paused trials back (restore from checkpoint)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.paused = at, set()

    def on_trial_result(self, tune_controller, trial, result):
        if result["step"] == self.at and trial.trial_id not in self.paused:
            self.paused.add(trial.trial_id)
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE


def test_pause_and_resume_lose_nothing(tiny_model_dir, tiny_dataset_path, tmp_path):
    """PBT-style: trials take turns on one reused trial actor (reset_config), each paused once."""
    task = make_task(tiny_model_dir, tiny_dataset_path, checkpoint_every=3)
    lrs = [1e-3, 3e-3]
    sched = PauseOnce(at=4)  # between checkpoints: the PAUSE checkpoint itself must be exact
    grid, rec = run(task, {**BASE, "lr": tune.grid_search(lrs)}, tmp_path, "pause", scheduler=sched,
                    reuse_actors=True, max_concurrent_trials=1)
    assert len(sched.paused) == 2
    assert len({row["pid"] for row in rec.rows}) == 1  # one actor served both trials, 4 turns
    ref = reference_losses(task, [{**BASE, "lr": lr} for lr in lrs], task.max_steps)
    losses, steps = rec.losses(), rec.steps()
    for i, lr in enumerate(lrs):
        tid = by_lr(grid)[lr].metrics["trial_id"]
        assert steps[tid] == list(range(1, task.max_steps + 1))  # resumed at 5: nothing redone
        assert all(close(losses[tid][s + 1], ref[i][s]) for s in range(task.max_steps))


class DriverCrash(RuntimeError):
    pass


def test_tuner_restore_after_driver_failure(tiny_model_dir, tiny_dataset_path, tmp_path):
    task = make_task(tiny_model_dir, tiny_dataset_path)
    lrs = [1e-3, 3e-3]

    def crash(trial, result):
        if result["step"] == 5:
            raise DriverCrash("simulated driver failure")

    with pytest.raises(Exception):
        run(task, {**BASE, "lr": tune.grid_search(lrs)}, tmp_path, "restore", recorder=Recorder(on_result=crash))
    rec = Recorder()
    tuner = tune.Tuner.restore(str(tmp_path / "restore"), trainable=lora_trainable(task),
                               resume_unfinished=True, resume_errored=True)
    # Tuner.restore brings back the pickled RunConfig, crashing callback included, and takes no
    # new one: swap the callbacks on the restored tuner (private, but the only way in Ray 2.x).
    tuner._local_tuner._run_config.callbacks = [rec]
    grid = tuner.fit()
    assert all(r.error is None and r.metrics["step"] == task.max_steps for r in grid)
    ref = reference_losses(task, [{**BASE, "lr": lr} for lr in lrs], task.max_steps)
    for i, lr in enumerate(lrs):
        tid = by_lr(grid)[lr].metrics["trial_id"]
        resumed = rec.steps()[tid]
        assert resumed[0] % task.checkpoint_interval == 1 and resumed[-1] == task.max_steps, resumed
        assert all(close(rec.losses()[tid][s], ref[i][s - 1]) for s in resumed)
