"""The AdapterGroup actor driven directly (no Tune): validation, run-ahead, non-finite losses,
checkpoint round trip, eviction of silent and dead trials. Real local Ray cluster, CPU."""
from __future__ import annotations

import math
import time

import pytest
import ray

from alto_ray.tune.checkpoint import pending_results, reported_step
from alto_ray.tune.task import LoRATask
from alto_ray.tune.trainable import connect

GOOD = {"rank": 4, "alpha": 8, "lr": 3e-3, "batch_size": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def group(tiny_model_dir, tiny_dataset_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=50, eval_every=5, eval_size=8,
                    max_seq_len=48, name="group-test", lease_timeout_s=3.0, nonfinite_patience=3)
    handle, spec = connect(task)
    yield task, handle
    ray.shutdown()


def cfg(task: LoRATask, **changes) -> dict:
    return task.adapter_dict({**GOOD, **changes})


def ask(handle, trial: str):
    return ray.get(handle.next_result.remote(trial), timeout=60)


@ray.remote(num_cpus=0)
class Owner:  # stands in for a trial actor
    def ping(self) -> bool:
        return True


def test_check_names_the_bad_field(group):
    task, handle = group
    assert ray.get(handle.check.remote(cfg(task))) is None
    assert "AdapterConfig.rank" in ray.get(handle.check.remote(cfg(task, rank=0)))
    assert "AdapterConfig.lr" in ray.get(handle.check.remote(cfg(task, lr=-1.0)))
    assert "AdapterConfig.batch_size" in ray.get(handle.check.remote(cfg(task, batch_size="four")))


def test_results_state_round_trip_and_eval(group):
    task, handle = group
    ray.get(handle.join.remote("a", cfg(task)))
    first = ask(handle, "a")
    assert first["step"] == 1 and math.isfinite(first["eval_loss"]) and first["eval_step"] == 1
    assert first["alto_group"] == "alto:group-test:g0" and first["max_steps"] == 50 and not first["done"]
    second = ask(handle, "a")
    assert second["eval_step"] == 1 and second["eval_loss"] == first["eval_loss"]  # carried
    assert second["tokens"] > first["tokens"] > 0
    files = ray.get(handle.get_state.remote("a"))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= set(files)
    third = ask(handle, "a")
    assert ray.get(handle.leave.remote("a", "stopped"))
    ray.get(handle.join.remote("a", cfg(task), files))  # resume from the step-2 checkpoint
    again = ask(handle, "a")
    assert again["step"] == 3 and again["tokens"] == third["tokens"]
    assert math.isclose(again["loss"], third["loss"], rel_tol=1e-5)
    ray.get(handle.leave.remote("a", "stopped"))


def test_checkpoint_carries_results_trained_ahead(group):
    """The group trains ahead of what a trial fetched; its checkpoint keeps those results, and a
    restore reports them before training on: no step redone, no report skipped."""
    task, handle = group
    ahead = task.run_ahead_steps
    ray.get(handle.join.remote("p", cfg(task)))
    assert ask(handle, "p")["step"] == 1
    deadline = time.monotonic() + 30
    while ray.get(handle.describe.remote())["members"]["p"]["step"] < 1 + ahead:
        assert time.monotonic() < deadline, "the group did not train ahead"
        time.sleep(0.05)
    time.sleep(0.3)
    assert ray.get(handle.describe.remote())["members"]["p"]["step"] == 1 + ahead  # and no further
    files = ray.get(handle.get_state.remote("p"))
    pending = pending_results(files)
    assert [r["step"] for r in pending] == list(range(2, 2 + ahead)) and reported_step(files) == 1
    ray.get(handle.leave.remote("p", "stopped"))
    ray.get(handle.join.remote("p2", cfg(task), files))
    replay = ray.get(handle.next_results.remote("p2", ahead + 1), timeout=60)
    assert [r["step"] for r in replay] == list(range(2, 3 + ahead))
    assert [r["loss"] for r in replay[:ahead]] == [r["loss"] for r in pending]
    assert replay[-1]["tokens"] > pending[-1]["tokens"]
    ray.get(handle.leave.remote("p2", "stopped"))


def test_nonfinite_adapter_ends_alone(group):
    task, handle = group
    ray.get(handle.join.remote("good", cfg(task)))
    ray.get(handle.join.remote("nan", cfg(task, lr=1e20)))
    seen = []
    for _ in range(5):
        good, bad = ray.get([handle.next_result.remote("good"), handle.next_result.remote("nan")], timeout=60)
        seen.append(bad)
        assert math.isfinite(good["loss"])
        if bad["done"]:
            break
    assert not seen[0]["done"] and math.isnan(seen[-1]["loss"]) and seen[-1]["done"]
    assert len(seen) == 1 + task.nonfinite_patience  # one finite step, then `patience` NaNs
    with pytest.raises(RuntimeError, match="already finished"):
        ask(handle, "nan")
    assert ask(handle, "good")["step"] == len(seen) + 1  # never waits for the finished one
    for t in ("good", "nan"):
        ray.get(handle.leave.remote(t, "stopped"))


def test_silent_and_dead_trials_are_evicted(group):
    task, handle = group
    owner = Owner.remote()
    ray.get(owner.ping.remote())
    ray.get(handle.join.remote("alive", cfg(task)))
    ray.get(handle.join.remote("silent", cfg(task)))  # never asks: the lease evicts it
    ray.get(handle.join.remote("dead", cfg(task), None, owner))
    ray.kill(owner)  # its trial actor died without leaving: the ping evicts it
    t0 = time.monotonic()
    # The group trains each adapter at most `run_ahead` steps past what its trial fetched, so
    # "silent" (never fetches) stops it after `run_ahead` steps, and "alive" (which may have
    # trained that many alone before the others joined) gets at most 2 × run_ahead results
    # before only the evictions of "silent" and "dead" can free the group.
    last = 2 * task.run_ahead_steps + 1
    for step in range(1, last + 1):
        assert ask(handle, "alive")["step"] == step
    assert time.monotonic() - t0 < task.lease_timeout_s + 5
    members = ray.get(handle.describe.remote())["members"]
    assert members["silent"]["state"] == "evicted" and "lease" in members["silent"]["reason"]
    assert members["dead"]["state"] == "evicted" and "died" in members["dead"]["reason"]
    with pytest.raises(LookupError, match="evicted|lease"):
        ask(handle, "silent")
    assert ask(handle, "alive")["step"] == last + 1
    ray.get(handle.leave.remote("alive", "done"))


def test_idle_group_exits_and_a_new_one_takes_its_name(group, tiny_model_dir, tiny_dataset_path):
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=5, eval_size=8,
                    name="idle-test", idle_timeout_s=1.0)
    handle, spec = connect(task, "t_00000")
    assert ray.get(handle.check.remote(cfg(task))) is None  # no reservation: nothing keeps it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(spec.name, namespace="alto")
        except ValueError:
            break  # exited: a detached group does not outlive its work
        time.sleep(0.5)
    else:
        pytest.fail("idle group did not exit")
    again, _ = connect(task, "t_00001")
    assert ray.get(again.load.remote())["active"] == 0
    ray.kill(again)


def test_an_out_of_memory_cap_outlives_the_group(group, tiny_model_dir, tiny_dataset_path):
    # A group that ran out of memory with 3 adapters leaves a cap of 2 for its task; a new group
    # of that task admits 2 and queues the third. The cap only ever goes down.
    from alto_ray.tune.admission import clear_oom_cap, oom_cap, record_oom

    name = "oom-cap-test"
    assert oom_cap(name) is None
    assert record_oom(name, 3) == 2 and record_oom(name, 5) == 2 and oom_cap(name) == 2
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=5, eval_size=8, name=name)
    handle, _ = connect(task, "t_00000")
    states = [ray.get(handle.join.remote(t, cfg(task)))["state"] for t in ("a", "b", "c")]
    assert states == ["active", "active", "queued"]
    for t in ("a", "b", "c"):
        ray.get(handle.leave.remote(t, "stopped"))
    ray.kill(handle)
    clear_oom_cap(name)
    assert oom_cap(name) is None



def test_a_trial_waits_for_its_tasks_new_groups_without_spending_attempts(group):
    # After a node loss the tenant publishes an empty placement while it queues for new groups;
    # a trial restored meanwhile waits for the new grant instead of failing (Tune's max_failures).
    import threading

    from alto_ray.cluster.node_loss import drop_grant, grant_key, publish_grant
    from alto_ray.cluster.tenant import GrantedPlacement

    task, handle = group
    specs = task.group_specs()
    key = grant_key(task.task_name, "regrant-test")
    publish_grant(key, [])
    waiting = task.replace(placement=GrantedPlacement(specs, key=key))
    assert waiting.placement.may_change and waiting.group_specs() == []
    later = threading.Timer(1.5, publish_grant, (key, specs))
    later.start()
    try:
        t0 = time.monotonic()
        found, spec = connect(waiting, attempts=1, backoff_s=0.01, regrant_wait_s=30)
        assert time.monotonic() - t0 >= 1.4 and spec.name == specs[0].name
        assert ray.get(found.load.remote())["closing"] is False
        # A fixed placement (no published key) with no group still fails at once.
        with pytest.raises(RuntimeError, match="holds no group"):
            connect(task.replace(placement=GrantedPlacement([])), attempts=1, backoff_s=0.01)
        # So does a changing one once its wait is over.
        publish_grant(key, [])
        with pytest.raises(RuntimeError, match="holds no group"):
            connect(waiting, attempts=1, backoff_s=0.01, regrant_wait_s=0.2)
    finally:
        later.cancel()
        drop_grant(key)
