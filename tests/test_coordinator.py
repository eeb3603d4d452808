"""Coordinator on a real local Ray cluster (2 CPUs, no GPU: groups use CPU bundles)."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from alto_ray.cluster import GIB, TaskSpec  # noqa: E402
from alto_ray.cluster.coordinator import COORDINATOR_NAME, COORDINATOR_NAMESPACE, get_coordinator  # noqa: E402
from tune_support import local_ray  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(namespace="alto-test"):
        yield


def _spec(name: str, backbone_gb: float = 4.0, gpg: int = 2) -> TaskSpec:
    # gpus_per_group=2 on a 2-slot node: one tenant fills the cluster, the next must queue.
    return TaskSpec(name, int(backbone_gb * GIB), GIB // 4, num_adapters=4, gpus_per_group=gpg, max_groups=1,
                    params=1e8, tokens_per_adapter_step=512, steps_per_adapter=50)


def _wait_ready(grant) -> None:
    ray.get(grant.placement_group.ready(), timeout=30)


def test_two_tenants_queue_finish_restart_and_infeasible(ray_cluster, tmp_path) -> None:
    state = str(tmp_path / "coordinator.json")
    coord = get_coordinator(state_path=state, time_limit_s=1.0)
    assert ray.get(coord.register_task.remote(_spec("tenant-a"))) == "tenant-a"
    assert ray.get(coord.register_task.remote(_spec("tenant-b"))) == "tenant-b"
    assert ray.get(coord.register_task.remote(_spec("tenant-a"))) == "tenant-a"     # idempotent

    a = ray.get(coord.request_groups.remote("tenant-a"))
    assert a["status"] == "granted" and len(a["groups"]) == 1
    ga = a["groups"][0]
    assert ga.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and ga.strategy == "STRICT_PACK"
    _wait_ready(ga)
    b = ray.get(coord.request_groups.remote("tenant-b"))
    assert b == {"status": "wait", "position": 1, "eta_s": pytest.approx(b["eta_s"])} and b["eta_s"] > 0
    plan = ray.get(coord.plan.remote())
    assert plan.for_task("tenant-a")[0].running and plan.task_start("tenant-b") > 0
    assert "tenant-b" in ray.get(coord.describe.remote())

    ray.get(coord.report_progress.remote("tenant-a", 0.5, 20, adapters_in_group=4))
    ray.get(coord.task_finished.remote("tenant-a", {"best_eval_loss": 1.23, "best_trial": "t3"}))
    b = ray.get(coord.request_groups.remote("tenant-b"))
    assert b["status"] == "granted"
    _wait_ready(b["groups"][0])
    metrics = ray.get(coord.metrics.remote())
    assert metrics["finished"] == 1 and metrics["running"] == 1 and metrics["prediction_error"]["count"] == 1

    # Kill the coordinator mid-run and bring it back: finished results and B's group survive.
    ray.kill(coord)
    deadline = time.time() + 20
    while True:
        try:
            ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE)
        except ValueError:
            break
        assert time.time() < deadline
        time.sleep(0.1)
    coord = get_coordinator(state_path=state, time_limit_s=1.0)
    done = ray.get(coord.finished_results.remote())
    assert done["tenant-a"]["results"] == {"best_eval_loss": 1.23, "best_trial": "t3"}
    assert ray.get(coord.register_task.remote(_spec("tenant-b"))) == "tenant-b"        # tenant re-registers
    again = ray.get(coord.request_groups.remote("tenant-b"))
    assert again["status"] == "granted" and again["groups"][0].pg_name == b["groups"][0].pg_name
    assert ray.get(coord.request_groups.remote("tenant-a"))["status"] == "finished"
    assert ray.get(coord.status.remote()) == {"tenant-a": "finished", "tenant-b": "running"}

    # A third tenant queues behind B; after B finishes it gets the freed slots.
    ray.get(coord.register_task.remote(_spec("tenant-c", gpg=1)))
    assert ray.get(coord.request_groups.remote("tenant-c"))["status"] == "wait"
    ray.get(coord.task_finished.remote("tenant-b", {"best_eval_loss": 0.9}))
    c = ray.get(coord.request_groups.remote("tenant-c"))
    assert c["status"] == "granted" and len(c["groups"]) >= 1
    for g in c["groups"]:
        _wait_ready(g)
    ray.get(coord.task_finished.remote("tenant-c", None))

    with pytest.raises(ValueError, match=r"too-big.*GiB"):
        ray.get(coord.register_task.remote(_spec("too-big", backbone_gb=400, gpg=1)))


def test_a_report_without_a_measured_step_keeps_the_planned_end(tmp_path) -> None:
    """Steps slower than the tenant's polls give reports with step_time 0: they must not swap the
    running group's planned end for the FLOPs prior (an H100 figure, ~0 s for a tiny model), which
    granted the next tenant while this one still trained. No Ray: the coordinator's logic alone."""
    from alto_ray.cluster import NodeSpec
    from alto_ray.cluster.coordinator import Coordinator, GroupGrant, TaskEntry

    coord = Coordinator(state_path=str(tmp_path / "state.json"), nodes=[NodeSpec("n0", 2)])
    spec = _spec("slow", gpg=2)
    coord.register_task(spec)
    now = time.time()
    grant = GroupGrant("slow", 0, "n0", (0, 1), None, "alto:slow:0", [{"CPU": 1.0}] * 2, "STRICT_PACK",
                       now, now + 100.0)
    coord.tasks["slow"] = entry = TaskEntry(spec, status="running", groups={0: grant})
    coord.report_progress("slow", 0.0, 20, max_trial_remaining_steps=20)
    assert coord._remaining(entry) == pytest.approx(100.0, abs=2.0)      # still the plan's end
    coord.report_progress("slow", 2.0, 20, adapters_in_group=1, max_trial_remaining_steps=20)
    assert coord._remaining(entry) == pytest.approx(40.0)                 # measured: 20 steps x 2 s


def test_a_task_that_fits_no_node_now_is_left_out_of_the_plan_with_its_reason(tmp_path) -> None:
    """No Ray: the coordinator's logic over explicit nodes. The 80 GiB node leaves: the task that
    needs it is not planned (planning it failed every tenant's call) and says why, the other one
    is; once the node is back the task is planned again."""
    from alto_ray.cluster import InfeasibleTaskError, NodeSpec
    from alto_ray.cluster.coordinator import Coordinator

    large, small = NodeSpec("large", 2, 80 * GIB), NodeSpec("small", 2, 24 * GIB)
    coord = Coordinator(state_path=str(tmp_path / "state.json"), nodes=[large, small], time_limit_s=0.5)
    big = _spec("big", backbone_gb=40, gpg=1)          # 40.25 GiB a GPU: the large node only
    coord.register_task(big, job_id="job-big")
    coord.register_task(_spec("tiny", backbone_gb=4, gpg=1), job_id="job-tiny")
    assert coord.plan().for_task("big")[0].node == "large"

    coord._set_nodes([small])                          # as `_refresh_nodes` does when the node died
    plan = coord.plan()
    assert plan.for_task("big") == [] and plan.for_task("tiny")[0].node == "small"
    answer = coord.request_groups("big")
    assert answer["status"] == "wait" and answer["position"] == 2 and answer["eta_s"] is None
    assert answer["reason"] == ("task 'big' does not fit any GPU: backbone 40.0 GiB over 1 GPU(s) + one adapter "
                                "0.25 GiB = 40.2 GiB per GPU > 24.0 GiB (largest GPU on a node with 1+ GPUs); "
                                "planned over 1 node up (1 x 2 GPUs of 24.0 GiB) and none the autoscaler can start")
    assert coord.status() == {"big": "blocked", "tiny": "queued"}
    assert f"  big: {answer['reason']}" in coord.describe()

    restarted = Coordinator(state_path=str(tmp_path / "state.json"), nodes=[small], time_limit_s=0.5)
    assert restarted.status() == {"big": "blocked", "tiny": "queued"}   # the queue is in its state file
    lost = Coordinator(state_path=str(tmp_path / "lost.json"), nodes=[small], time_limit_s=0.5)   # no file
    with pytest.raises(InfeasibleTaskError, match="'big' does not fit"):
        lost.register_task(big)                        # a new task that fits no node is refused ...
    lost.register_task(big, requeue=True)              # ... one registered before the restart queues
    assert lost.status() == {"big": "blocked"}

    coord._set_nodes([large, small])                   # a node that fits is back: planned again
    assert coord.plan().for_task("big")[0].node == "large"
    assert coord.status() == {"big": "queued", "tiny": "queued"} and "fits no node" not in coord.describe()


def test_queued_tasks_keep_their_order_across_a_restart(tmp_path) -> None:
    """No Ray: the coordinator's logic over an explicit node. The queue is in the state file, so
    a task registered first after a restart queues behind the ones queued before it, and their
    tenants re-registering (requeue=True, in any order) keep their places, each once."""
    import json

    from alto_ray.cluster import NodeSpec
    from alto_ray.cluster.coordinator import Coordinator

    state = tmp_path / "state.json"
    coord = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    for name in ("first", "second", "third"):
        coord.register_task(_spec(name), job_id=f"job-{name}")

    restarted = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    assert {t: e.job_id for t, e in restarted.tasks.items()} == {t: f"job-{t}" for t in ("first", "second", "third")}
    restarted.register_task(_spec("late"))
    for name in ("third", "first", "second"):
        restarted.register_task(_spec(name), requeue=True, job_id=f"job-{name}-again")
    by_order = sorted(restarted.tasks, key=lambda t: restarted.tasks[t].order)
    assert by_order == list(restarted.tasks) == ["first", "second", "third", "late"]   # planned in that order
    assert restarted.tasks["first"].job_id == "job-first-again"   # the driver registering last owns it
    assert restarted.status() == dict.fromkeys(by_order, "queued")
    assert list(json.loads(state.read_text())["queued"]) == by_order

    # A task without a job id is not reloaded: nothing could tell that its tenant died.
    again = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    assert list(again.tasks) == ["first", "second", "third"]

    # A state file from before the queue was saved (no "queued" key) still loads.
    data = json.loads(state.read_text())
    data.pop("queued")
    data["finished"] = {"old": {"results": {"best_loss": 1.0}}}
    state.write_text(json.dumps(data))
    older = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    assert older.status() == {"old": "finished"} and older.finished["old"]["results"] == {"best_loss": 1.0}


def test_queued_tasks_of_another_ray_cluster_are_not_reloaded(ray_cluster, tmp_path) -> None:
    """Job ids restart with every Ray cluster: a queue saved under another session must not come
    back (its job ids may name this cluster's live drivers); finished results do."""
    import json

    from alto_ray.cluster import NodeSpec
    from alto_ray.cluster.coordinator import Coordinator

    state = tmp_path / "state.json"
    coord = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    for name in ("first", "second"):
        coord.register_task(_spec(name), job_id=f"job-{name}")
    data = json.loads(state.read_text())
    assert data["ray_session"].startswith("session_")  # written under this cluster's session
    same = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    assert list(same.tasks) == ["first", "second"]      # this cluster's file: the queue comes back

    data = json.loads(state.read_text())
    data["ray_session"] = "session_of_an_earlier_cluster"
    data["finished"] = {"old": {"results": {"best_loss": 1.0}}}
    state.write_text(json.dumps(data))
    later = Coordinator(state_path=str(state), nodes=[NodeSpec("n0", 2)], time_limit_s=0.5)
    assert later.tasks == {} and later.status() == {"old": "finished"}
    assert json.loads(state.read_text())["queued"] == {}
