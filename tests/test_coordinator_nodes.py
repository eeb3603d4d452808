"""The coordinator follows the cluster's nodes: joins, deaths, and nodes the autoscaler can start.

A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`, CPU only; nodes may
declare logical GPUs). The coordinator is the plain class in the driver, so the test can look at
its plan between calls; the actor is this class.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ray.util.placement_group import placement_group_table  # noqa: E402

from alto_ray.cluster import GIB, TaskSpec, gcs  # noqa: E402
from alto_ray.cluster.coordinator import Coordinator  # noqa: E402
from alto_ray.cluster.liveness import dead_jobs  # noqa: E402
from alto_ray.cluster.nodes import remove_pg  # noqa: E402
from alto_ray.tune.capacity import BOOTSTRAP_ENV, launchable_worker_types  # noqa: E402
from tune_support import local_cluster, until, write_bootstrap  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


def _spec(name: str, backbone_gb: float = 4.0, gpg: int = 2, groups: int = 1, work_s: float | None = None) -> TaskSpec:
    return TaskSpec(name, int(backbone_gb * GIB), GIB // 4, num_adapters=4, gpus_per_group=gpg, max_groups=groups,
                    work_s=work_s, params=1e8, tokens_per_adapter_step=512, steps_per_adapter=50)


def _state(grant) -> str:
    return placement_group_table(grant.placement_group)["state"]


def test_a_node_that_joins_is_planned_on_and_one_that_dies_leaves_the_plan(cluster, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")         # no autoscaler: CPU slots stand in for GPUs
    state = str(tmp_path / "coordinator.json")
    coord = Coordinator(state_path=state, time_limit_s=0.5)
    (head,) = coord.nodes_view()
    assert head.num_gpus == 2 and not coord.use_gpu
    for name in ("a", "b"):                           # 2 slots per group: one task fills a node
        coord.register_task(_spec(name))
    a = coord.request_groups("a")["groups"][0]
    assert a.node == head.name
    ray.get(a.placement_group.ready(), timeout=30)
    assert coord.request_groups("b")["status"] == "wait"

    new = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    b = coord.request_groups("b")                     # the plan sees the new node: b starts there
    assert b["status"] == "granted"
    (gb,) = b["groups"]
    assert gb.node != head.name and coord.plan().node_ids[gb.node] == new.node_id
    ray.get(gb.placement_group.ready(), timeout=30)
    assert placement_group_table(gb.placement_group)["bundles_to_node_id"][0] == new.node_id
    coord.task_finished("a", {"best_loss": 1.5})

    cluster.remove_node(new)                          # b's node dies: its group is released
    until(lambda: len(coord.nodes_view()) == 1)
    assert coord.status() == {"a": "finished", "b": "queued"}
    (loss,) = coord.node_losses("b")                  # recorded for b's tenant, naming the node
    assert (loss.node_id, loss.groups, loss.pg_names, loss.requeued) == (new.node_id, (0,), (gb.pg_name,), True)
    assert coord.node_losses("a") == []
    assert _state(gb) == "REMOVED"
    plan = coord.plan()
    assert set(plan.node_gpus) == {head.name} and plan.for_task("b")[0].node == head.name
    b = coord.request_groups("b")                     # re-granted on the head, freed by a
    assert b["status"] == "granted" and b["groups"][0].node == head.name
    ray.get(b["groups"][0].placement_group.ready(), timeout=30)
    assert coord.finished_results()["a"]["results"] == {"best_loss": 1.5}

    again = Coordinator(state_path=state, time_limit_s=0.5)   # a restart keeps both
    assert again.status() == {"a": "finished", "b": "running"}
    assert again.node_losses("b") == [loss]           # persisted with the state
    again.task_finished("b", None)
    assert again.finished_results()["b"]["node_losses"][0]["node_id"] == new.node_id
    assert _state(b["groups"][0]) == "REMOVED"


def test_a_running_task_whose_placement_group_is_gone_but_not_its_node_is_not_reloaded(cluster, tmp_path,
                                                                                        monkeypatch) -> None:
    """Unlike a task whose node died while the coordinator was down (reloaded queued, the loss
    told to its tenant), one whose placement group went while its node lives is no node loss:
    nothing is recorded, nothing would tell its tenant to ask for new groups, so it is not
    reloaded; its tenant re-registers when it next calls."""
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")
    state = str(tmp_path / "coordinator.json")
    coord = Coordinator(state_path=state, time_limit_s=0.5)
    coord.register_task(_spec("gone"), job_id=ray.get_runtime_context().get_job_id())
    (g,) = coord.request_groups("gone")["groups"]
    ray.get(g.placement_group.ready(), timeout=30)
    remove_pg(g.placement_group)                      # by hand, while no coordinator runs
    again = Coordinator(state_path=state, time_limit_s=0.5)
    assert again.status() == {} and again.node_losses("gone") == []


def test_with_no_gpu_up_a_task_is_granted_a_node_the_autoscaler_will_start(cluster, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, write_bootstrap(tmp_path))
    assert launchable_worker_types() == [("gpu4", {"CPU": 8.0, "GPU": 4.0}, 2)]
    coord = Coordinator(state_path=str(tmp_path / "coordinator.json"), time_limit_s=0.5)
    nodes = coord.nodes_view()                        # GPU mode over the potential nodes, not CPU slots
    assert coord.use_gpu and [n.name for n in nodes] == ["autoscale:gpu4:0", "autoscale:gpu4:1"]
    assert all(n.ray_node_id is None and n.num_gpus == 4 and n.gpu_memory_bytes == 80 * GIB for n in nodes)
    assert coord.register_task(_spec("big", backbone_gb=20, gpg=4)) == "big"
    with pytest.raises(ValueError, match=r"too-big.*GiB.*autoscaler"):
        coord.register_task(_spec("too-big", backbone_gb=400, gpg=1))
    with pytest.raises(ValueError, match=r"wide.*wants 8 GPUs"):
        coord.register_task(_spec("wide", gpg=8))

    grant = coord.request_groups("big")
    assert grant["status"] == "granted"
    (g,) = grant["groups"]
    assert g.node.startswith("autoscale:gpu4:") and g.bundles == [{"GPU": 1.0, "CPU": 1.0}] * 4
    time.sleep(0.5)
    assert _state(g) == "PENDING"                     # no GPU anywhere: it waits for the autoscaler
    text = coord.describe()
    assert "potential nodes" in text and f"{g.node} [in plan]" in text
    assert coord.metrics()["potential_gpus"] == 8 and coord.metrics()["gpus"] == 0

    # The autoscaler's node comes up: the pending group lands there and the coordinator records it
    # on that node, which is no longer counted among the potential ones.
    up = cluster.add_node(num_cpus=4, num_gpus=4)
    try:
        until(lambda: not coord.plan().for_task("big")[0].node.startswith("autoscale:"))
        real = coord.plan().for_task("big")[0]
        assert coord.plan().node_ids[real.node] == up.node_id and real.gpu_ids == (0, 1, 2, 3) and real.running
        assert [n.name for n in coord.nodes_view()] == [real.node, "autoscale:gpu4:0"]
        assert _state(g) == "CREATED"
        coord.withdraw("big")
        assert _state(g) == "REMOVED"
    finally:
        cluster.remove_node(up)
        until(lambda: all(n["NodeID"] != up.node_id for n in ray.nodes() if n["Alive"]))


def test_alive_gpus_first_new_nodes_only_when_waiting_for_one_pays(cluster, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, write_bootstrap(tmp_path))
    gpu = cluster.add_node(num_cpus=2, num_gpus=1)    # one alive GPU, and two 4-GPU nodes to start
    cluster.wait_for_nodes()
    try:
        coord = Coordinator(state_path=str(tmp_path / "coordinator.json"), time_limit_s=0.5,
                            autoscale_delay_s=300.0)
        alive = [n.name for n in coord.nodes_view() if n.ray_node_id]
        assert len(alive) == 1 and len(coord.nodes_view()) == 3
        for name in ("short", "next"):
            coord.register_task(_spec(name, gpg=1, work_s=60.0))
        (s,) = coord.request_groups("short")["groups"]
        assert s.node == alive[0]
        ray.get(s.placement_group.ready(), timeout=30)
        # 60 s behind `short` on the alive GPU beats a node that takes 300 s to start
        assert coord.request_groups("next")["status"] == "wait"
        assert {a.node for a in coord.plan().assignments} == {alive[0]}

        coord.register_task(_spec("long", gpg=1, groups=4, work_s=36000.0))
        grant = coord.request_groups("long")          # 4 new GPUs in 300 s beat 10 h on one
        assert grant["status"] == "granted" and len(grant["groups"]) == 4
        assert all(g.node.startswith("autoscale:gpu4:") for g in grant["groups"])
        assert all(_state(g) == "PENDING" for g in grant["groups"])
        for name in ("long", "next"):
            coord.withdraw(name)
        coord.task_finished("short", None)
        assert all(_state(g) == "REMOVED" for g in grant["groups"] + [s])
    finally:
        cluster.remove_node(gpu)


def test_a_task_that_fits_no_node_left_waits_with_its_reason_and_the_others_go_on(cluster, tmp_path,
                                                                                   monkeypatch) -> None:
    """Its only large node died: planning it would fail every tenant's call; it waits, saying why,
    and is granted once a node that fits joins."""
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")         # CPU slots; no autoscaler to start a large node
    large = cluster.add_node(num_cpus=4)              # the only node with 4 slots
    cluster.wait_for_nodes()
    again = None
    try:
        coord = Coordinator(state_path=str(tmp_path / "coordinator.json"), time_limit_s=0.5)
        coord.register_task(_spec("wide", gpg=4))
        (w,) = coord.request_groups("wide")["groups"]
        assert coord.plan().node_ids[w.node] == large.node_id
        for name in ("a", "b"):                       # 2 slots a group: one fills the head
            coord.register_task(_spec(name))
        (ga,) = coord.request_groups("a")["groups"]
        ray.get(ga.placement_group.ready(), timeout=30)
        assert coord.request_groups("b")["status"] == "wait"

        cluster.remove_node(large)                    # wide's groups go; no node left has 4 slots
        until(lambda: len(coord.nodes_view()) == 1)
        assert coord.status() == {"wide": "blocked", "a": "running", "b": "queued"}
        b = coord.request_groups("b")                 # the others still plan: b queues behind a
        assert b["status"] == "wait" and b["position"] == 1 and "reason" not in b
        told = coord.request_groups("wide")
        assert told["status"] == "wait" and told["position"] == 2 and told["eta_s"] is None
        assert re.search(r"'wide' wants 4 GPUs per group on one node; the largest node has 2; planned over 1 node "
                         r"up \(1 x 2 GPUs of 80\.0 GiB\) and none the autoscaler can start", told["reason"])
        assert told["node_losses"][0].node_id == large.node_id
        text = coord.describe()
        assert "fits no node now" in text and f"wide: {told['reason']}" in text
        metrics = coord.metrics()
        assert metrics["blocked"] == 1 and metrics["queued"] == 1
        assert metrics["tasks"]["wide"] == {**metrics["tasks"]["wide"], "status": "blocked", "reason": told["reason"]}
        assert coord.request_groups("a")["groups"] == [ga] and _state(ga) == "CREATED"   # a is left alone

        coord.task_finished("a", None)                # b gets the head
        (gb,) = coord.request_groups("b")["groups"]
        ray.get(gb.placement_group.ready(), timeout=30)
        again = cluster.add_node(num_cpus=4)          # a node that fits joins: wide is planned there
        cluster.wait_for_nodes()
        grant = coord.request_groups("wide")
        assert grant["status"] == "granted" and coord.status()["wide"] == "running"
        (w2,) = grant["groups"]
        ray.get(w2.placement_group.ready(), timeout=30)
        assert placement_group_table(w2.placement_group)["bundles_to_node_id"][0] == again.node_id
        assert "fits no node now" not in coord.describe()
        for name in ("wide", "b"):
            coord.withdraw(name)
    finally:
        for node in (large, again):
            if node is not None and any(n["NodeID"] == node.node_id for n in ray.nodes() if n["Alive"]):
                cluster.remove_node(node)


def test_a_task_that_fits_no_node_left_is_planned_once_the_autoscaler_can_start_one(cluster, tmp_path,
                                                                                    monkeypatch) -> None:
    """GPU mode: the 4-GPU node dies and no worker type can replace it, until the launcher's
    config gains one: the coordinator re-reads it while a task waits for a node."""
    config = tmp_path / "ray_bootstrap_config.yaml"  # not there yet: nothing to start
    monkeypatch.setenv(BOOTSTRAP_ENV, str(config))
    one, four = cluster.add_node(num_cpus=1, num_gpus=1), cluster.add_node(num_cpus=4, num_gpus=4)
    cluster.wait_for_nodes()
    try:
        coord = Coordinator(state_path=str(tmp_path / "coordinator.json"), time_limit_s=0.5)
        coord.register_task(_spec("wide", gpg=4))
        coord.register_task(_spec("narrow", gpg=1))
        (w,) = coord.request_groups("wide")["groups"]
        assert coord.plan().node_ids[w.node] == four.node_id
        cluster.remove_node(four)
        until(lambda: len(coord.nodes_view()) == 1)
        told = coord.request_groups("wide")
        assert "'wide' wants 4 GPUs" in told["reason"] and "none the autoscaler can start" in told["reason"]
        (n,) = coord.request_groups("narrow")["groups"]
        assert coord.plan().node_ids[n.node] == one.node_id

        assert write_bootstrap(tmp_path) == str(config)   # a 4-GPU type the autoscaler can start
        grant = coord.request_groups("wide")
        assert grant["status"] == "granted" and grant["groups"][0].node.startswith("autoscale:gpu4:")
        assert _state(grant["groups"][0]) == "PENDING"
        for name in ("wide", "narrow"):
            coord.withdraw(name)
    finally:
        for node in (one, four):
            if any(n["NodeID"] == node.node_id for n in ray.nodes() if n["Alive"]):
                cluster.remove_node(node)


def test_a_gcs_read_that_does_not_answer_in_time_counts_as_unknown(cluster, tmp_path, monkeypatch) -> None:
    """A slow GCS must not freeze the coordinator. While its reads of the node and job tables
    wait (here an earlier read of each that timed out still waits, so `gcs.bounded_read` gives
    up on the next at once) it plans on the nodes as they were (a node that joined is not seen,
    the running group is kept) and counts every tenant alive (a dead driver's task is not
    abandoned); once the GCS answers it sees both."""
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")
    driver = "import ray, sys; ray.init(address=sys.argv[1]); print(ray.get_runtime_context().get_job_id())"
    dead = subprocess.run([sys.executable, "-c", driver, cluster.address], capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()[-1]
    until(lambda: dead_jobs([dead]))                  # a driver that has exited: its job is dead
    coord = Coordinator(state_path=str(tmp_path / "coordinator.json"), time_limit_s=0.5, liveness_check_s=3600)
    (head,) = coord.nodes_view()
    coord.register_task(_spec("a"))
    (ga,) = coord.request_groups("a")["groups"]

    release = threading.Event()
    for table in (gcs.NODES, gcs.JOBS):               # a read of each table that the GCS does not answer
        with pytest.raises(gcs.GcsReadTimeout):
            gcs.bounded_read(table, lambda: release.wait(60), timeout_s=0.1)
    new = None
    try:
        new = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        coord.register_task(_spec("ghost"), job_id=dead)
        t0 = time.monotonic()
        assert coord.nodes_view() == [head] and coord.check_liveness(force=True) == []
        assert coord.status() == {"a": "running", "ghost": "queued"} and time.monotonic() - t0 < 2
        metrics = coord.metrics()
        assert not metrics["node_table_readable"] and not metrics["liveness"]["job_table_readable"]
    finally:
        release.set()
    try:
        until(lambda: len(coord.nodes_view()) == 2)   # the GCS answers again: the new node is seen ...
        (event,) = until(lambda: coord.check_liveness(force=True))   # ... and the dead driver
        assert (event.task_id, event.job_id, event.status) == ("ghost", dead, "queued")
        assert coord.status() == {"a": "running", "ghost": "abandoned"} and coord.metrics()["node_table_readable"]
        assert coord.request_groups("a")["groups"] == [ga] and _state(ga) == "CREATED"
        coord.withdraw("a")
    finally:
        if new is not None:
            cluster.remove_node(new)
