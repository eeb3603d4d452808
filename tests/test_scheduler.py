"""AltoScheduler: unit tests on synthetic curves (on_trial_result driven directly, with stub
`Trial`s as Ray's own scheduler tests build them) and one run on a real local Ray cluster."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from alto_ray.tune import AltoScheduler, StopReason
from alto_ray.tune.scheduler import DECISION_KEY, AltoDecisionCallback

PLANNED = 100


def make_trial(task: Optional[str] = "A", **config) -> Trial:
    if task is not None:
        config["task"] = task
    return Trial("__fake", config=config, stub=True)


def sched(**kw) -> AltoScheduler:
    """Small, fast-reacting settings; warm-up ends at step 10 of 100."""
    args = dict(metric="loss", mode="min", grace_period=1, warmup_frac=0.1, window=5,
                smoothing=0.5, min_survivors=1)
    args.update(kw)
    return AltoScheduler(**args)


def good(t: int, scale: float = 1.0) -> float:
    return scale * (0.5 + 1.5 * math.exp(-0.05 * t))


def run(s: AltoScheduler, curves: Dict[Trial, Sequence[float]], metric: str = "loss"
        ) -> Dict[Trial, Optional[Tuple[int, StopReason]]]:
    """Feed the curves in lock-step (step 1 of every trial, then step 2, ...) as Tune would;
    return, per trial, (step, reason) of its STOP or None if it ran to the end."""
    for trial in curves:
        s.on_trial_add(None, trial)
    stopped: Dict[Trial, Optional[Tuple[int, StopReason]]] = {t: None for t in curves}
    for i in range(max(map(len, curves.values()))):
        for trial, curve in curves.items():
            if stopped[trial] or i >= len(curve):
                continue
            result = {"training_iteration": i + 1, metric: curve[i], "max_steps": PLANNED}
            if s.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                stopped[trial] = (i + 1, s.stop_reason(trial.trial_id))
                s.on_trial_complete(None, trial, result)
    return stopped


def curve(fn, n: int = 60) -> List[float]:
    return [fn(t) for t in range(1, n + 1)]


def test_nan_stops_immediately_even_in_warmup_and_below_min_survivors():
    s = sched(min_survivors=5)
    bad = make_trial()
    out = run(s, {make_trial(): curve(good), bad: [2.0, float("nan"), 1.0]})
    assert out[bad] == (2, StopReason.NAN)
    assert s.exit_counts()["A"]["nan"] == 1


def test_diverging_stopped_after_warmup():
    s = sched()
    div = make_trial()
    # tracks the good curve, then the loss blows up at step 20 (LR too high)
    out = run(s, {make_trial(): curve(good), make_trial(): curve(lambda t: good(t, 1.02)),
                  div: curve(lambda t: good(t) * (1 if t < 20 else 1.6 ** (t - 19)))})
    step, reason = out[div]
    assert reason is StopReason.DIVERGING and 20 <= step <= 23
    assert sum(v is None for v in out.values()) == 2


def test_diverging_from_the_start_waits_for_warmup():
    s = sched(warmup_frac=0.3)
    div = make_trial()
    out = run(s, {make_trial(): curve(good), div: curve(lambda t: 2.0 * 1.05 ** t)})
    assert out[div] == (30, StopReason.DIVERGING)
    assert s.last_decision(div.trial_id) == "stop:diverging"


def test_plateau():
    s = sched()
    flat = make_trial()
    slow = lambda t: 1.8 - 0.005 * t  # noqa: E731  (peers improve slowly: 0.3% a step)
    out = run(s, {make_trial(): curve(slow), make_trial(): curve(lambda t: slow(t) + 0.01),
                  flat: curve(lambda t: 1.8 - 0.02 * min(t, 3))})  # learns a bit, then stalls
    assert out[flat][1] is StopReason.PLATEAU and out[flat][0] <= 15  # ~3% behind: not BEHIND
    assert sum(v is None for v in out.values()) == 2


def test_leader_is_never_stopped_for_plateau():
    s = sched(min_survivors=0)
    leader, follower = make_trial(), make_trial()
    out = run(s, {leader: [1.0] * 40, follower: [1.05] * 40})  # both flat; 5% apart
    assert out[leader] is None
    assert out[follower] is not None and out[follower][1] is StopReason.PLATEAU


def test_behind():
    s = sched()
    slow = make_trial()
    out = run(s, {make_trial(): curve(good), make_trial(): curve(lambda t: good(t, 1.02)),
                  slow: curve(lambda t: good(t, 1.3))})  # improving, but 30% worse at every step
    assert out[slow] == (10, StopReason.BEHIND)


def test_nothing_stopped_during_warmup():
    s = sched(warmup_frac=0.25)
    terrible = [make_trial() for _ in range(3)]
    curves = {make_trial(): curve(good)}
    curves.update({t: curve(lambda i, k=k: good(i, 2.0 + k)) for k, t in enumerate(terrible)})
    out = run(s, curves)
    assert all(out[t] is not None and out[t][0] == 25 for t in terrible)
    assert s.exit_counts()["A"]["behind"] == 3


def test_warmup_from_constructor_max_t_when_not_reported():
    s = sched(max_t=50, warmup_frac=0.4)
    a, b = make_trial(), make_trial()
    for tr in (a, b):
        s.on_trial_add(None, tr)
    for i in range(1, 30):
        s.on_trial_result(None, a, {"training_iteration": i, "loss": good(i)})
        d = s.on_trial_result(None, b, {"training_iteration": i, "loss": good(i, 3.0)})
        if d == TrialScheduler.STOP:
            break
    assert i == 20 and s.stop_reason(b.trial_id) is StopReason.BEHIND


def test_min_survivors_respected():
    s = sched(min_survivors=2)
    best, bad1, bad2 = make_trial(), make_trial(), make_trial()
    out = run(s, {best: curve(good), bad1: curve(lambda t: good(t, 1.5)),
                  bad2: curve(lambda t: good(t, 1.6))})
    assert out[best] is None
    assert sum(v is not None for v in out.values()) == 1  # 3 trials, 2 must survive
    held = bad2 if out[bad1] else bad1
    assert s.last_decision(held.trial_id) == "held:behind"
    assert "1 held by min_survivors" in s.debug_string()


def test_tasks_do_not_mix():
    s = sched()
    a1, a2 = make_trial("A"), make_trial("A")
    b1, b2 = make_trial("B"), make_trial("B")
    # task B's losses are 3x task A's: not behind A, only judged against B
    out = run(s, {a1: curve(good), a2: curve(lambda t: good(t, 1.02)),
                  b1: curve(lambda t: good(t, 3.0)), b2: curve(lambda t: good(t, 3.0 * 1.3))})
    assert out[a1] is None and out[a2] is None and out[b1] is None
    assert out[b2] == (10, StopReason.BEHIND)
    counts = s.exit_counts()
    assert counts["A"]["behind"] == 0 and counts["B"]["behind"] == 1
    assert "A: 2 running" in s.debug_string() and "B: 1 running" in s.debug_string()


def test_task_key_nested_and_trainable_fallback():
    s = AltoScheduler(metric="loss", mode="min", task_key="task/name")
    assert s.task_of(Trial("__fake", config={"task": {"name": "sft"}}, stub=True)) == "sft"
    assert s.task_of(make_trial(None, lr=1.0)) == "__fake"


def test_mode_max():
    s = sched(metric="acc", mode="max")
    acc = lambda t: 0.9 - 0.6 * math.exp(-0.05 * t)  # noqa: E731
    falling, flat, low = make_trial(), make_trial(), make_trial()
    out = run(s, {make_trial(): curve(acc), make_trial(): curve(lambda t: acc(t) * 0.99),
                  falling: curve(lambda t: acc(t) if t < 20 else acc(t) * 0.3 ** (t - 19)),
                  flat: [0.3] * 60, low: curve(lambda t: acc(t) * 0.7)}, metric="acc")
    for trial in out:
        assert trial.config.get("task") == "A"
    assert out[falling][1] is StopReason.DIVERGING
    assert out[flat][1] in (StopReason.PLATEAU, StopReason.BEHIND)
    assert out[low][1] is StopReason.BEHIND
    assert sum(v is None for v in out.values()) == 2


def test_metric_and_mode_from_tune_config():
    s = AltoScheduler()
    assert s.set_search_properties("loss", "min")
    assert not s.set_search_properties("other", "max")  # already set: like ASHA
    with pytest.raises(ValueError):
        AltoScheduler().on_trial_add(None, make_trial())


def test_save_restore_round_trip(tmp_path):
    trials = [make_trial() for _ in range(4)]
    curves = [curve(good), curve(lambda t: good(t, 1.05)), curve(lambda t: 2.0 - 0.01 * min(t, 12)),
              curve(lambda t: good(t) * (1 if t < 25 else 1.5 ** (t - 24)))]
    a = sched()
    for tr in trials:
        a.on_trial_add(None, tr)

    def step(s: AltoScheduler, i: int) -> List[str]:
        return [s.on_trial_result(None, tr, {"training_iteration": i, "loss": c[i - 1], "max_steps": PLANNED})
                for tr, c in zip(trials, curves)]

    for i in range(1, 16):
        step(a, i)
    path = str(tmp_path / "sched.pkl")
    a.save(path)
    b = AltoScheduler()
    b.restore(path)
    assert [step(a, i) for i in range(16, 61)] == [step(b, i) for i in range(16, 61)]
    assert a.stop_reasons == b.stop_reasons and len(a.stop_reasons) >= 2
    assert a.debug_string() == b.debug_string()


def test_pause_remove_error_and_replay_bookkeeping():
    s = sched(min_survivors=1)
    a, b = make_trial(), make_trial()
    run(s, {a: curve(good, 15), b: curve(good, 15)})
    assert "A: 2 running" in s.debug_string()
    b.set_status(Trial.PAUSED)  # paused trials stay alive; the controller later removes them
    s.on_trial_remove(None, b)
    assert "A: 1 running" in s.debug_string()
    s.on_trial_error(None, a)  # a retry re-adds the trial, which replays from its checkpoint
    a.set_status(Trial.PENDING)
    s.on_trial_add(None, a)
    for i in range(10, 16):
        assert s.on_trial_result(None, a, {"training_iteration": i, "loss": good(i), "max_steps": PLANNED}) \
            == TrialScheduler.CONTINUE
    assert s._trials[a.trial_id].times == list(range(1, 16))  # replayed steps replaced, not doubled
    finished = make_trial()
    finished.set_status(Trial.TERMINATED)  # added on experiment resume: not counted as running
    s.on_trial_add(None, finished)
    assert "A: 1 running" in s.debug_string()


def test_reason_written_to_last_result_and_callback():
    s = sched()
    bad = make_trial()
    bad.run_metadata.last_result = {"loss": float("nan")}
    result = {"training_iteration": 1, "loss": float("nan")}
    assert s.on_trial_result(None, bad, result) == TrialScheduler.STOP
    logged = dict(result)
    AltoDecisionCallback(s).on_trial_result(iteration=1, trials=[bad], trial=bad, result=logged)
    assert logged[DECISION_KEY] == "stop:nan"
    s.on_trial_complete(None, bad, result)
    assert bad.run_metadata.last_result[DECISION_KEY] == "stop:nan"


# ---------------------------------------------------------------------- real Ray cluster
@pytest.fixture(scope="module")
def ray_local():
    import sys

    import ray
    from ray import cloudpickle

    # tests/ is not importable on Ray workers: ship this module's trainable by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


STEPS = 40


def _synthetic_trainable(config: Dict) -> None:
    import os
    import time

    from ray import tune

    lr, sync = config["lr"], config["sync_dir"]
    open(os.path.join(sync, str(lr)), "w").close()  # barrier: start together, so peers overlap
    deadline = time.time() + 60
    while len(os.listdir(sync)) < config["n"] and time.time() < deadline:
        time.sleep(0.05)
    for t in range(1, STEPS + 1):
        loss = 0.5 + 1.5 * math.exp(-(0.1 + 10 * min(lr, 2e-3)) * t)  # faster with lr, to 2e-3
        if lr >= 1.0:  # too high: as good as the best at first, then blows up
            loss *= 1.0 if t < 12 else 3.0 ** (t - 11)
        elif lr <= 1e-5:  # too low: the adapter does not move
            loss = 2.0
        tune.report({"loss": loss, "max_steps": STEPS})
        time.sleep(0.05)  # keeps concurrent trials near the same step


def test_real_tune_run(ray_local, tmp_path):
    from ray import tune

    sync = tmp_path / "sync"
    sync.mkdir()
    # behind_threshold high: the flat trial is reported as PLATEAU before it falls 50% behind
    scheduler = AltoScheduler(grace_period=2, warmup_frac=0.1, window=4, smoothing=0.5,
                              behind_threshold=0.5, min_survivors=2)
    tuner = tune.Tuner(
        tune.with_resources(_synthetic_trainable, {"cpu": 0.5}),
        param_space={"lr": tune.grid_search([1e-5, 1e-3, 2e-3, 1.0]), "n": 4, "sync_dir": str(sync)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="alto_sched", verbose=0,
                                  callbacks=[AltoDecisionCallback(scheduler)]),
    )
    grid = tuner.fit()
    by_lr = {r.config["lr"]: r for r in grid}
    assert not grid.errors
    for lr, reason in ((1.0, StopReason.DIVERGING), (1e-5, StopReason.PLATEAU)):
        res = by_lr[lr]
        assert res.metrics["training_iteration"] < STEPS
        assert res.metrics[DECISION_KEY] == f"stop:{reason.value}"
        assert scheduler.stop_reason(res.metrics["trial_id"]) is reason
    for lr in (1e-3, 2e-3):
        res = by_lr[lr]
        assert res.metrics["training_iteration"] == STEPS
        assert scheduler.stop_reason(res.metrics["trial_id"]) is None
        assert res.metrics_dataframe[DECISION_KEY].iloc[-1] == "continue"
    assert scheduler.exit_counts()["_synthetic_trainable"] == {"nan": 0, "diverging": 1, "plateau": 1, "behind": 0}
