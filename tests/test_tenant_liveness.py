"""A tenant whose driver dies without finishing or withdrawing is abandoned by the coordinator.

A real local Ray (2 CPUs, no GPU: the coordinator plans 2 CPU slots) and the real coordinator
actor. The dying tenant is a second driver, a real subprocess running `Tenant`, killed with
SIGKILL: nothing of it gets to tell the coordinator, only Ray's job table says it died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ray = pytest.importorskip("ray")

from ray.util.placement_group import get_placement_group, placement_group_table  # noqa: E402

from alto_ray.cluster import GIB, TaskSpec  # noqa: E402
from alto_ray.cluster.coordinator import get_coordinator  # noqa: E402
from alto_ray.cluster.liveness import dead_jobs  # noqa: E402
from alto_ray.cluster.node_loss import read_grant  # noqa: E402
from alto_ray.cluster.nodes import lookup_pg, remove_pg  # noqa: E402
from alto_ray.cluster.tenant import Tenant  # noqa: E402
from alto_ray.tune.capacity import BOOTSTRAP_ENV  # noqa: E402
from alto_ray.tune.task import LoRATask  # noqa: E402
from tune_support import kill_coordinator, local_ray, until  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])

# The second driver: registers a task through `Tenant`, waits for its groups, prints its job id,
# the key of the placement it published and its placement group names, then idles until killed.
TENANT_DRIVER = r"""
import sys, time
import ray
from alto_ray.cluster import GIB
from alto_ray.cluster.tenant import Tenant
from alto_ray.tune.task import LoRATask

address, model, data, name, slots = sys.argv[1:6]
ray.init(address=address, namespace="alto-test", log_to_driver=False, configure_logging=False)
task = LoRATask(model=model, dataset=data, name=name, max_steps=8, device="cpu")
tenant = Tenant(task, 4, gpus_per_group=int(slots), max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64)
tenant.register()
tenant.acquire()
print(ray.get_runtime_context().get_job_id(), tenant.grant_key, *[g.pg_name for g in tenant.grants], flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with local_ray(namespace="alto-test"):
        yield


@pytest.fixture
def coordinator(ray_cluster, tmp_path, monkeypatch) -> Iterator[Callable[..., Any]]:
    """Make the coordinator actor (state in tmp_path); afterwards kill it and remove the
    placement groups it left (a failed test must not fill the next one's cluster)."""
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")         # forwarded to the coordinator: CPU slots, no autoscaler
    options = {"state_path": str(tmp_path / "coordinator.json"), "time_limit_s": 0.5}

    def make(**kwargs: Any) -> Any:
        return get_coordinator(**{**options, **kwargs})

    make.options = options
    yield make
    kill_coordinator()
    for info in placement_group_table().values():
        if info["name"].startswith("alto:") and info["state"] != "REMOVED" and (pg := lookup_pg(info["name"])):
            remove_pg(pg)


@pytest.fixture
def spawn_tenant(ray_cluster, tmp_path, tiny_model_dir, tiny_dataset_path) -> Iterator[Callable[..., Any]]:
    """Start a second driver running a `Tenant` (its task takes `slots` CPU slots); returns
    (the process, its Ray job id, its grant key, its placement group names) once granted, or at
    once (None, None, []) with `granted=False`. Killed afterwards."""
    procs: list[subprocess.Popen] = []

    def spawn(name: str, slots: int,
              granted: bool = True) -> tuple[subprocess.Popen, str | None, str | None, list[str]]:
        log = tmp_path / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", TENANT_DRIVER, ray.get_runtime_context().gcs_address,
                                     tiny_model_dir, tiny_dataset_path, name, str(slots)],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        procs.append(proc)
        if not granted:
            return proc, None, None, []
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(90)
        if not line or not line[0].strip():
            proc.kill()
            pytest.fail(f"tenant driver {name} was not granted:\n{log.read_text()[-4000:]}")
        job, key, *pg_names = line[0].split()
        return proc, job, key, pg_names

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _spec(name: str, slots: int) -> TaskSpec:
    return TaskSpec(name, GIB, GIB // 64, num_adapters=4, gpus_per_group=slots, max_groups=1,
                    params=1e8, tokens_per_adapter_step=512, steps_per_adapter=50)


def _pg_state(pg_name: str) -> str:
    pg = lookup_pg(pg_name)
    return "REMOVED" if pg is None else placement_group_table(pg)["state"]


def test_a_killed_tenant_is_abandoned_its_groups_freed_and_the_next_tenant_granted(coordinator, spawn_tenant) -> None:
    coord = coordinator(liveness_check_s=0.5)
    me = ray.get_runtime_context().get_job_id()
    ray.get(coord.register_task.remote(_spec("done", 1), job_id=me))
    ray.get(coord.task_finished.remote("done", {"best_loss": 1.25}))

    proc, job, key, (pg_name,) = spawn_tenant("doomed", slots=2)       # fills both slots
    waiting, _, _, _ = spawn_tenant("waiting", slots=2, granted=False)   # queued behind it
    until(lambda: "waiting" in ray.get(coord.status.remote()), timeout_s=60)
    ray.get(coord.register_task.remote(_spec("next", 2), job_id=me))
    assert ray.get(coord.request_groups.remote("next"))["status"] == "wait"
    assert ray.get(coord.plan.remote()).for_task("waiting")            # planned, holding a place
    tasks = ray.get(coord.metrics.remote())["tasks"]
    assert (tasks["doomed"]["status"], tasks["doomed"]["job_id"]) == ("running", job)   # the tenant sent its job
    assert tasks["waiting"]["status"] == "queued" and tasks["waiting"]["job_id"] not in (None, job, me)
    pg = get_placement_group(pg_name)                 # looked up while it exists
    assert placement_group_table(pg)["state"] == "CREATED"
    assert [g.name for g in read_grant(key)] == ["alto:doomed:g0"]   # the placement its trials read

    for p in (proc, waiting):
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    # Nobody calls the coordinator here: its own timer notices the dead job and frees the group.
    until(lambda: placement_group_table(pg)["state"] == "REMOVED", timeout_s=20)

    def both_abandoned() -> dict | None:              # the other job may be marked dead just after that check
        metrics = ray.get(coord.metrics.remote())
        return metrics if len(metrics["abandoned"]) == 2 else None

    metrics = until(both_abandoned)
    event, queued = sorted(metrics["abandoned"], key=lambda x: x["task_id"] != "doomed")
    assert (event["task_id"], event["job_id"], event["status"], list(event["pg_names"]), event["on_restart"]) == \
        ("doomed", job, "running", [pg_name], False)
    assert event["job_ended_at"] <= event["at"] < event["job_ended_at"] + 10
    assert (queued["task_id"], queued["job_id"], queued["status"], list(queued["pg_names"])) == \
        ("waiting", tasks["waiting"]["job_id"], "queued", [])
    assert metrics["liveness"]["job_table_readable"]
    assert read_grant(key) is None                    # dropped: its driver never will
    assert ray.get(coord.status.remote()) == {"doomed": "abandoned", "waiting": "abandoned", "next": "queued",
                                              "done": "finished"}
    assert f"doomed: driver job {job} died at " in ray.get(coord.describe.remote())

    assert ray.get(coord.plan.remote()).for_task("waiting") == []     # out of the plan
    granted = ray.get(coord.request_groups.remote("next"))    # the slots the dead tenant held
    assert granted["status"] == "granted"
    ray.get(granted["groups"][0].placement_group.ready(), timeout=30)

    state = json.loads(Path(coordinator.options["state_path"]).read_text())
    assert sorted(x["task_id"] for x in state["abandoned"]) == ["doomed", "waiting"]
    assert set(state["running"]) == {"next"}
    assert state["finished"]["done"]["results"] == {"best_loss": 1.25}
    ray.get(coord.task_finished.remote("next", None))


def test_a_live_tenant_and_a_task_without_a_job_id_are_never_abandoned(coordinator, tiny_model_dir,
                                                                      tiny_dataset_path) -> None:
    coord = coordinator(liveness_check_s=0.2)
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="alive", max_steps=8, device="cpu")
    tenant = Tenant(task, 4, gpus_per_group=1, max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64,
                    coordinator_options={**coordinator.options, "liveness_check_s": 0.2})
    tenant.register()
    tenant.acquire()
    (grant,) = tenant.grants
    ray.get(coord.register_task.remote(_spec("legacy", 1)))   # an older tenant: no job id
    me = ray.get_runtime_context().get_job_id()

    first = ray.get(coord.metrics.remote())["liveness"]["checks"]
    until(lambda: ray.get(coord.metrics.remote())["liveness"]["checks"] >= first + 5, timeout_s=20)
    metrics = ray.get(coord.metrics.remote())
    assert metrics["liveness"]["job_table_readable"] and metrics["abandoned"] == []
    assert {t: (x["status"], x["job_id"]) for t, x in metrics["tasks"].items()} == \
        {"alive": ("running", me), "legacy": ("queued", None)}
    assert _pg_state(grant.pg_name) == "CREATED"

    # The coordinator restarts: the tenant re-registers with its job id and keeps its group.
    kill_coordinator()
    tenant.call("status")
    coord = tenant.coordinator
    assert tenant.reconnects == 1
    until(lambda: ray.get(coord.metrics.remote())["liveness"]["checks"] >= 3, timeout_s=20)
    metrics = ray.get(coord.metrics.remote())
    assert (metrics["tasks"]["alive"]["status"], metrics["tasks"]["alive"]["job_id"]) == ("running", me)
    assert metrics["abandoned"] == [] and _pg_state(grant.pg_name) == "CREATED"
    tenant.finish({"best_loss": 1.0})


def test_a_tenant_that_died_while_the_coordinator_was_down_is_abandoned_when_it_restarts(coordinator, spawn_tenant
                                                                                         ) -> None:
    coord = coordinator(liveness_check_s=0.5)
    proc, job, key, (orphan_pg,) = spawn_tenant("orphan", slots=1)
    me = ray.get_runtime_context().get_job_id()
    ray.get(coord.register_task.remote(_spec("kept", 1), job_id=me))
    kept = ray.get(coord.request_groups.remote("kept"))
    assert kept["status"] == "granted"
    (kept_pg,) = [g.pg_name for g in kept["groups"]]

    kill_coordinator()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    until(lambda: dead_jobs([job]))                   # Ray marked the driver's job dead ...
    assert _pg_state(orphan_pg) == "CREATED"          # ... and no coordinator is up to free its group
    assert read_grant(key) is not None                # ... or drop its published placement

    # A timer too slow to matter: only the check the coordinator makes as it starts can see it.
    coord = coordinator(liveness_check_s=3600)
    metrics = ray.get(coord.metrics.remote())
    (event,) = metrics["abandoned"]
    assert (event["task_id"], event["job_id"], list(event["pg_names"]), event["on_restart"]) == \
        ("orphan", job, [orphan_pg], True)
    assert metrics["liveness"]["checks"] == 1
    until(lambda: _pg_state(orphan_pg) == "REMOVED")
    assert read_grant(key) is None                    # the key came back with the state file
    assert ray.get(coord.status.remote()) == {"orphan": "abandoned", "kept": "running"}
    assert _pg_state(kept_pg) == "CREATED" and metrics["tasks"]["kept"]["job_id"] == me
    assert f"orphan: driver job {job} died at " in ray.get(coord.describe.remote())
    assert "as the coordinator restarted at " in ray.get(coord.describe.remote())
    ray.get(coord.task_finished.remote("kept", None))


def test_a_queued_tenant_that_died_while_the_coordinator_was_down_is_abandoned_when_it_restarts(
        coordinator, spawn_tenant) -> None:
    """The queue is in the state file: a queued tenant's task comes back queued, in its place,
    and the liveness check the coordinator makes as it starts gives it up if its driver died."""
    coord = coordinator(liveness_check_s=None)        # off: only the restarted coordinator may see it
    me = ray.get_runtime_context().get_job_id()
    ray.get(coord.register_task.remote(_spec("holder", 2), job_id=me))
    assert ray.get(coord.request_groups.remote("holder"))["status"] == "granted"   # fills both slots
    proc, _, _, _ = spawn_tenant("ghost", slots=2, granted=False)
    until(lambda: "ghost" in ray.get(coord.status.remote()), timeout_s=60)
    ray.get(coord.register_task.remote(_spec("later", 2), job_id=me))
    job = ray.get(coord.metrics.remote())["tasks"]["ghost"]["job_id"]
    assert job not in (None, me)

    os.kill(proc.pid, signal.SIGKILL)                 # before the coordinator: it must not re-create it
    proc.wait()
    until(lambda: dead_jobs([job]))
    kill_coordinator()
    coord = coordinator(liveness_check_s=3600)        # only the check on restart can see it
    metrics = ray.get(coord.metrics.remote())
    (event,) = metrics["abandoned"]
    assert (event["task_id"], event["job_id"], event["status"], list(event["pg_names"]), event["on_restart"]) == \
        ("ghost", job, "queued", [], True)
    assert ray.get(coord.status.remote()) == {"ghost": "abandoned", "holder": "running", "later": "queued"}
    assert metrics["tasks"]["later"]["job_id"] == me
    ray.get(coord.task_finished.remote("holder", None))
    assert ray.get(coord.request_groups.remote("later"))["status"] == "granted"   # the dead one holds no place
    ray.get(coord.task_finished.remote("later", None))


@pytest.mark.parametrize("takes", ["spec and requeue", "a job id but no grant key"])
def test_a_coordinator_from_an_older_alto_ray_registers_the_task_with_what_it_takes(coordinator, tiny_model_dir,
                                                                                   tiny_dataset_path, caplog,
                                                                                   takes: str) -> None:
    """The coordinator is detached, so it outlives an upgrade of the tenants: one whose
    register_task takes no grant key, or no job id either, still registers them (with a
    warning), with liveness if it takes the job id."""
    from alto_ray.cluster.coordinator import COORDINATOR_NAME, COORDINATOR_NAMESPACE, Coordinator
    from alto_ray.tune.capacity import driver_bootstrap_config

    class BeforeLiveness(Coordinator):
        def register_task(self, spec: TaskSpec, requeue: bool = False) -> str:
            return super().register_task(spec, requeue)

    class BeforeGrantKeys(Coordinator):
        def register_task(self, spec: TaskSpec, requeue: bool = False, job_id: str | None = None) -> str:
            return super().register_task(spec, requeue, job_id)

    older_class = BeforeLiveness if takes == "spec and requeue" else BeforeGrantKeys
    older = ray.remote(num_cpus=0)(older_class).options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached").remote(
        **coordinator.options, bootstrap_config=driver_bootstrap_config())
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="upgraded", max_steps=8, device="cpu")
    tenant = Tenant(task, 4, gpus_per_group=1, max_groups=1, backbone_bytes=GIB, adapter_bytes=GIB // 64,
                    coordinator_options=coordinator.options)
    with caplog.at_level("WARNING", logger="alto_ray.cluster.liveness"):
        assert tenant.register() == "upgraded"
    me = ray.get_runtime_context().get_job_id()
    assert ray.get(tenant.coordinator.metrics.remote())["tasks"]["upgraded"]["job_id"] == \
        (None if older_class is BeforeLiveness else me)
    assert ray.get(older.status.remote())["upgraded"] in ("queued", "running")
    warned = [r.getMessage() for r in caplog.records if "older alto-ray" in r.getMessage()]
    assert [m.rsplit("without its ", 1)[1].split()[0] for m in warned] == \
        (["grant_key", "job_id"] if older_class is BeforeLiveness else ["grant_key"])
    tenant.withdraw()
