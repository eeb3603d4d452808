"""The coordinator actor lives on the head node.

A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head and a worker,
2 CPUs each, no GPU: the coordinator plans CPU slots). The coordinator is the detached actor the
tenants create (`get_coordinator`).
"""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from alto_ray.cluster.coordinator import get_coordinator  # noqa: E402
from alto_ray.tune.capacity import BOOTSTRAP_ENV  # noqa: E402
from tune_support import kill_coordinator, local_cluster, write_bootstrap  # noqa: E402


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
