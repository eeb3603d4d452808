"""A real sweep under AltoScheduler on a local Ray cluster (CPU, tiny Llama).

One Tune run covers: the best config is found; bad configs (lr far too high → NaN, lr far too
high → stuck, lr tiny) are stopped early with the right reason; an invalid config fails only its
own trial; the survivors' losses equal a GroupedTrainer run that never saw the losers; the best
checkpoint loads with `PeftModel.from_pretrained`.
"""
from __future__ import annotations

import json
import os

import pytest
import ray
from ray import tune

from alto_ray.tune.metrics import TrialExitMetrics
from alto_ray.tune.scheduler import AltoDecisionCallback, AltoScheduler
from alto_ray.tune.task import LoRATask
from alto_ray.tune.trainable import lora_trainable
from tune_support import Recorder, close, load_peft_checkpoint, reference_losses

GOOD = [3e-3, 1e-2, 3e-2]
NAN_LR, HIGH_LR, TINY_LR, INVALID_LR = 1e20, 30.0, 1e-7, 5e-3  # INVALID_LR marks the rank-0 trial
BASE = {"alpha": 8, "batch_size": 4, "dropout": 0.0}
MAX_STEPS = 30


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tiny_dataset_path, tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=MAX_STEPS, eval_every=10,
                    eval_size=16, max_seq_len=48, name="sweep-test", idle_timeout_s=5.0)
    lrs = GOOD + [NAN_LR, HIGH_LR, TINY_LR, INVALID_LR]
    # The tiny model's loss only falls from ~3.56 to ~3.1 and flattens early, so: a tighter
    # "behind" than the default and no plateau rule (it would also catch the flat good curves).
    scheduler = AltoScheduler(grace_period=6, window=8, smoothing=0.3, behind_threshold=0.07,
                              plateau_threshold=0.0, min_survivors=2)
    rec, exits = Recorder(), TrialExitMetrics(scheduler)
    tuner = tune.Tuner(
        lora_trainable(task),
        param_space={**BASE, "lr": tune.grid_search(lrs),
                     "rank": tune.sample_from(lambda spec: 0 if spec.config.lr == INVALID_LR else 4)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(name="sweep", storage_path=str(tmp_path_factory.mktemp("sweep")), verbose=0,
                                  callbacks=[rec, AltoDecisionCallback(scheduler), exits]))
    grid = tuner.fit()
    yield task, grid, {r.config["lr"]: r for r in grid if r.config}, rec, exits
    ray.shutdown()


def test_invalid_config_fails_only_its_trial(sweep):
    _, grid, by_lr, _, _ = sweep
    assert grid.num_errors == 1  # its setup raised before it joined; Tune has no config for it
    (failed,) = [r for r in grid if r.error is not None]
    assert "AdapterConfig.rank" in str(failed.error) and "lr=0.0050" in failed.path
    assert sorted(by_lr) == sorted(GOOD + [NAN_LR, HIGH_LR, TINY_LR])


def test_bad_configs_stop_early_with_their_reason(sweep):
    _, _, by_lr, _, exits = sweep
    reason = {lr: by_lr[lr].metrics.get("alto_decision") for lr in (NAN_LR, HIGH_LR, TINY_LR)}
    assert reason[NAN_LR] == "stop:nan" and by_lr[NAN_LR].metrics["step"] <= 3
    assert reason[HIGH_LR] in ("stop:behind", "stop:diverging"), reason  # stuck at ~uniform loss
    assert reason[TINY_LR] == "stop:behind", reason
    for lr in (HIGH_LR, TINY_LR):
        assert by_lr[lr].metrics["step"] < MAX_STEPS
    for lr in GOOD:
        assert by_lr[lr].metrics["step"] == MAX_STEPS and by_lr[lr].metrics["done"]
    counts = exits.counts["sweep-test"]  # the early-exit metric, by reason
    assert counts["nan"] == 1 and counts["done"] == len(GOOD)
    assert counts.get("behind", 0) + counts.get("diverging", 0) == 2


def test_survivors_train_as_if_the_losers_never_existed(sweep):
    task, _, by_lr, rec, _ = sweep
    ref = reference_losses(task, [{**BASE, "rank": 4, "lr": lr} for lr in GOOD], MAX_STEPS)
    losses = rec.losses()
    for i, lr in enumerate(GOOD):
        got = losses[by_lr[lr].metrics["trial_id"]]
        assert sorted(got) == list(range(1, MAX_STEPS + 1))
        assert all(close(got[s + 1], ref[i][s]) for s in range(MAX_STEPS)), (lr, got, ref[i])


def test_best_config_is_found_and_its_checkpoint_is_a_peft_adapter(sweep, tiny_model_dir):
    task, grid, by_lr, _, _ = sweep
    best = grid.get_best_result(metric="eval_loss", mode="min", scope="last")
    finals = {lr: by_lr[lr].metrics["eval_loss"] for lr in GOOD}
    assert best.config["lr"] == min(finals, key=finals.get)
    assert best.metrics["eval_step"] == MAX_STEPS
    path = best.checkpoint.path
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= set(os.listdir(path))
    with open(os.path.join(path, "alto_checkpoint.json")) as f:
        assert json.load(f)["step"] == MAX_STEPS

    rank, changes = load_peft_checkpoint(tiny_model_dir, path)
    assert rank == 4 and changes  # the trained adapter changes the model
