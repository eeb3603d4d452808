"""A tenant whose node dies is told, and the coordinator actor lives on the head node.

A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head and a worker,
2 CPUs each, no GPU: the coordinator plans CPU slots). The coordinator is the detached actor the
tenants create (`get_coordinator`).
"""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

ray = pytest.importorskip("ray")

from ray.util.placement_group import placement_group_table  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy  # noqa: E402

from alto_ray.cluster import GIB  # noqa: E402
from alto_ray.cluster.coordinator import get_coordinator  # noqa: E402
from alto_ray.cluster.tenant import GrantedPlacement, Tenant  # noqa: E402
from alto_ray.tune.capacity import BOOTSTRAP_ENV  # noqa: E402
from alto_ray.tune.task import LoRATask  # noqa: E402
from alto_ray.tune.trainable import connect, lost_node  # noqa: E402
from tune_support import kill_coordinator, local_cluster, until, write_bootstrap  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        worker = c.add_node(num_cpus=2)
        c.wait_for_nodes()
        yield c, worker


def _head_id() -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


def test_the_coordinator_lands_on_the_head_and_reads_the_creators_bootstrap_config(cluster, tmp_path) -> None:
    _c, worker = cluster
    path = write_bootstrap(tmp_path)                  # a GPU worker type the autoscaler can start twice
    state = str(tmp_path / "coordinator.json")

    # A driver on a worker node, with the config named in its environment: Ray would start the
    # actor beside it, and the actor's process would not see that environment.
    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker.node_id, soft=False))
    def create_from_worker() -> tuple[str, dict]:
        os.environ[BOOTSTRAP_ENV] = path
        try:
            coord = get_coordinator(state_path=state, time_limit_s=0.5)
            return ray.get_runtime_context().get_node_id(), ray.get(coord.metrics.remote())
        finally:
            del os.environ[BOOTSTRAP_ENV]

    try:
        creator_node, metrics = ray.get(create_from_worker.remote(), timeout=60)
        assert creator_node == worker.node_id
        assert metrics["on_node"] == _head_id() != worker.node_id
        assert metrics["bootstrap_config"] == path
        assert metrics["potential_nodes"] == ["autoscale:gpu4:0", "autoscale:gpu4:1"]
        assert metrics["potential_gpus"] == 8
    finally:
        kill_coordinator()


def test_a_tenant_is_told_its_node_died_and_its_trials_find_the_new_groups(cluster, tmp_path, monkeypatch, caplog,
                                                                           tiny_model_dir, tiny_dataset_path) -> None:
    c, worker = cluster
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")         # forwarded to the coordinator: CPU slots, no autoscaler
    opts = {"state_path": str(tmp_path / "coordinator.json"), "time_limit_s": 0.5}

    def tenant(name: str) -> Tenant:                  # 2 slots a group: one tenant fills a node
        task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name=name, max_steps=8, device="cpu")
        return Tenant(task, 4, gpus_per_group=2, max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64,
                      coordinator_options=opts, poll_s=0.2)

    a, b = tenant("loss-a"), tenant("loss-b")
    a.register(), b.register()
    a.acquire(), b.acquire()
    on_worker = [t for t in (a, b) if placement_group_table(t.grants[0].placement_group)["bundles_to_node_id"][0]
                 == worker.node_id]
    assert len(on_worker) == 1, "one tenant a node"
    lost, kept = on_worker[0], ({a, b} - set(on_worker)).pop()
    (old,) = lost.grants
    old_spec = lost.task.placement.groups[0]

    @ray.remote(num_cpus=0, max_restarts=0)
    class Probe:                                      # an AdapterGroup in the granted bundle dies the same way
        def ping(self) -> str:
            return ray.get_runtime_context().get_node_id()

    probe = Probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        old.placement_group, placement_group_bundle_index=0)).remote()
    assert ray.get(probe.ping.remote(), timeout=30) == worker.node_id
    coord = lost.coordinator

    c.remove_node(worker)
    with pytest.raises(ray.exceptions.RayActorError) as died:   # what a trial sees from its group
        ray.get(probe.ping.remote(), timeout=30)
    assert f"node id {worker.node_id[:12]}" in lost_node(died.value)

    # The coordinator records the loss (its next node_losses call sees the dead node) ...
    (loss,) = until(lambda: ray.get(coord.node_losses.remote(lost.name)))
    assert (loss.node_id, loss.groups, loss.pg_names, loss.requeued) == (worker.node_id, (0,), (old.pg_name,), True)
    assert loss.address == worker.node_ip_address and loss.node == old.node
    assert kept.check_losses() == [] and ray.get(coord.node_losses.remote(kept.name)) == []
    metrics = ray.get(coord.metrics.remote())
    assert metrics["node_losses"][lost.name][0]["node_id"] == worker.node_id
    assert metrics["tasks"][lost.name]["status"] == "queued" and metrics["tasks"][kept.name]["status"] == "running"
    assert f"{lost.name}: node {loss.address} (node id {worker.node_id[:12]}) died" in ray.get(coord.describe.remote())
    until(lambda: placement_group_table(old.placement_group)["state"] == "REMOVED")

    # ... the tenant warns naming the node and the group, and queues for new groups while the
    # head is full; the other tenant finishing frees it.
    caplog.set_level(logging.WARNING, logger="alto_ray.cluster.tenant")
    told: list = []
    waiting = threading.Thread(target=lambda: told.extend(lost.check_losses()))
    waits = len(lost.waits)
    waiting.start()
    until(lambda: len(lost.waits) > waits)           # queued behind the other tenant
    assert lost.task.placement.groups == [] and GrantedPlacement([old_spec], key=lost.grant_key)(lost.task) == []
    kept.finish({"best_loss": 1.25})
    waiting.join(timeout=30)
    assert not waiting.is_alive() and [x.node_id for x in told] == [worker.node_id]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and lost.name in r.getMessage()]
    assert f"node {loss.address} (node id {worker.node_id[:12]})" in warning and "lost group(s) 0" in warning
    assert old.pg_name in warning and "queued again" in warning
    (new,) = lost.grants
    assert placement_group_table(new.placement_group)["bundles_to_node_id"][0] == _head_id()

    # A trial restored by Tune reads the placement the trainable was registered with (before the
    # loss): it finds the new group, and never waits on the removed one.
    trial_task = lost.base_task.replace(placement=GrantedPlacement([old_spec], key=lost.grant_key))
    seen = ray.get(ray.remote(num_cpus=0)(lambda t: [s.options["scheduling_strategy"].placement_group.id.hex()
                                         for s in t.group_specs()]).remote(trial_task), timeout=60)
    assert seen == [new.placement_group.id.hex()]
    stale = lost.base_task.replace(placement=GrantedPlacement([old_spec]))
    outcome: list = []

    def try_connect() -> None:
        try:
            connect(stale, attempts=2, backoff_s=0.05)
        except RuntimeError as err:
            outcome.append(str(err))

    trying = threading.Thread(target=try_connect, daemon=True)   # a group aimed there would wait forever
    trying.start()
    trying.join(timeout=20)
    assert len(outcome) == 1 and "no live AdapterGroup" in outcome[0] and f"{old_spec.name} were removed" in outcome[0]

    # Nothing finished is lost; the lost node stays on the task's finished record.
    lost.finish({"best_loss": 2.5})
    done = ray.get(coord.finished_results.remote())
    assert done[kept.name]["results"] == {"best_loss": 1.25} and "node_losses" not in done[kept.name]
    assert done[lost.name]["node_losses"][0]["node_id"] == worker.node_id
    assert GrantedPlacement([old_spec], key=lost.grant_key)(lost.task) == [old_spec]   # the key is dropped


def test_a_node_that_died_while_the_coordinator_was_down_is_told_after_its_restart(
        cluster, tmp_path, monkeypatch, caplog, tiny_model_dir, tiny_dataset_path) -> None:
    """The coordinator reloads its state: the groups on a node that died meanwhile are recorded
    lost for their tenant (once, though the tenant's re-attach names them too), the task left
    with none comes back queued in its place (ahead of one queued after it), as for a live loss,
    and the tenant is told and granted new groups."""
    c, _worker = cluster
    kill_coordinator()                                # one of an earlier test would keep its own state file
    added = c.add_node(num_cpus=2)                    # the module's worker may be gone already
    c.wait_for_nodes()
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")
    state = tmp_path / "coordinator.json"
    opts = {"state_path": str(state), "time_limit_s": 0.5}

    def tenant(name: str) -> Tenant:                  # 2 slots a group: one tenant fills a node
        task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name=name, max_steps=8, device="cpu")
        return Tenant(task, 4, gpus_per_group=2, max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64,
                      coordinator_options=opts, poll_s=0.2)

    try:
        a, b, later = tenant("down-a"), tenant("down-b"), tenant("down-later")
        a.register(), b.register()
        a.acquire(), b.acquire()
        later.register()                              # queued behind both (it never asks for groups)
        node_of = {t: placement_group_table(t.grants[0].placement_group)["bundles_to_node_id"][0] for t in (a, b)}
        lost = next(t for t in (a, b) if node_of[t] != _head_id())
        kept = ({a, b} - {lost}).pop()
        (old,) = lost.grants
        dying = next(n for n in c.list_all_nodes() if n.node_id == node_of[lost])
        saved = json.loads(state.read_text())["running"][lost.name]
        me = ray.get_runtime_context().get_job_id()
        assert (saved["job_id"], saved["grant_key"]) == (me, lost.grant_key)

        kill_coordinator()
        c.remove_node(dying)                          # while no coordinator runs
        until(lambda: all(n["NodeID"] != dying.node_id for n in ray.nodes() if n["Alive"]))
        kept.finish({"best_loss": 1.0})               # re-creates the coordinator: it reloads its state
        assert kept.reconnects == 1
        coord = kept.coordinator
        (loss,) = ray.get(coord.node_losses.remote(lost.name))
        assert (loss.node_id, loss.groups, loss.pg_names) == (dying.node_id, (0,), (old.pg_name,))
        assert loss.while_coordinator_down and loss.requeued and loss.address == dying.node_ip_address
        assert loss.reason == "received SIGTERM"      # Ray's death reason, from its node table
        assert "died, received SIGTERM while the coordinator was down" in ray.get(coord.describe.remote())
        until(lambda: placement_group_table(old.placement_group)["state"] == "REMOVED")
        metrics = ray.get(coord.metrics.remote())     # queued again, in its place: ahead of `later`
        assert [(t, x["status"], x["job_id"]) for t, x in metrics["tasks"].items()] == \
            [(lost.name, "queued", me), (later.name, "queued", me)]
        requeued = json.loads(state.read_text())["queued"][lost.name]
        assert (requeued["order"], requeued["grant_key"]) == (saved["order"], lost.grant_key)
        later.withdraw()                              # it would compete for the node kept frees

        caplog.set_level(logging.WARNING, logger="alto_ray.cluster.tenant")
        assert lost.check_losses() == [loss]          # reconnects, re-attaches, is told, queues: a node is free
        assert lost.reconnects == 1 and ray.get(coord.node_losses.remote(lost.name)) == [loss]   # recorded once
        assert any("while the coordinator was down" in r.getMessage() for r in caplog.records)
        (new,) = lost.grants
        assert placement_group_table(new.placement_group)["bundles_to_node_id"][0] != dying.node_id
        assert json.loads(state.read_text())["running"][lost.name]["order"] == saved["order"]   # re-registered in place
        lost.finish(None)
        assert ray.get(coord.finished_results.remote())[lost.name]["node_losses"][0]["while_coordinator_down"]
    finally:
        kill_coordinator()
        if any(n["NodeID"] == added.node_id for n in ray.nodes() if n["Alive"]):
            c.remove_node(added)


def test_a_tenant_whose_task_fits_no_node_left_is_told_why_and_gives_up_after_max_wait_s(
        cluster, tmp_path, monkeypatch, caplog, tiny_model_dir, tiny_dataset_path) -> None:
    """It registered while a node could host it; now none can: it waits, warning with the
    coordinator's reason, and its `max_wait_s` error names that reason."""
    c, _worker = cluster
    kill_coordinator()
    large = c.add_node(num_cpus=4)                    # the only node with 4 slots
    c.wait_for_nodes()
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="wide", max_steps=8, device="cpu")
    wide = Tenant(task, 4, gpus_per_group=4, max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64,
                  coordinator_options={"state_path": str(tmp_path / "coordinator.json"), "time_limit_s": 0.5},
                  max_wait_s=1.0)
    try:
        wide.register()                               # it fits then
        c.remove_node(large)
        until(lambda: ray.get(wide.coordinator.status.remote()).get("wide") == "blocked")
        caplog.set_level(logging.WARNING, logger="alto_ray.cluster.tenant")
        with pytest.raises(TimeoutError, match=r"'wide' still queued after \d+s \(position 1\): task 'wide' wants "
                                               r"4 GPUs per group on one node; the largest node has 2"):
            wide.acquire()
        assert all(w["reason"] and "none the autoscaler can start" in w["reason"] for w in wide.waits)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("alto tenant wide: waiting for a node that fits") and "'wide' wants 4" in warning
    finally:
        wide.withdraw()
        kill_coordinator()
        if any(n["NodeID"] == large.node_id for n in ray.nodes() if n["Alive"]):
            c.remove_node(large)
