"""Tenants on a real local Ray cluster (2 CPUs, no GPU: the coordinator plans 2 CPU slots).

Two tenants with different backbones train inside the placement groups the coordinator granted;
a tenant that arrives when the cluster is full is queued, then granted; a backbone that fits no
node fails before anything runs; a coordinator killed mid-run is re-created by the tenant, which
keeps training, and no finished result is lost.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402

from alto_ray.cluster.coordinator import get_coordinator  # noqa: E402
from alto_ray.cluster.tenant import Tenant, run_tenant  # noqa: E402
from alto_ray.tune.group import NAMESPACE  # noqa: E402
from alto_ray.tune.task import LoRATask  # noqa: E402
from tune_support import local_ray  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


@pytest.fixture(scope="module")
def env(ray_cluster, tmp_path_factory) -> dict:
    """Two tiny backbones of different sizes, a data set, the coordinator's state file."""
    from alto_ray.engine.testing import make_tiny_llama, write_arithmetic_jsonl

    root = tmp_path_factory.mktemp("multi_tenant")
    return {"small": make_tiny_llama(str(root / "llama-small")),
            "large": make_tiny_llama(str(root / "llama-large"), hidden_size=96, intermediate_size=192,
                                     num_hidden_layers=3),
            "data": write_arithmetic_jsonl(str(root / "arith.jsonl"), n=128),
            "results": str(root / "ray_results"),
            "coord": {"state_path": str(root / "coordinator.json"), "time_limit_s": 1.0}}


def _task(env: dict, model: str, name: str, steps: int) -> LoRATask:
    return LoRATask(model=env[model], dataset=env["data"], name=name, max_steps=steps, eval_every=steps,
                    eval_size=16, max_seq_len=32, device="cpu", idle_timeout_s=10.0,
                    adapter_defaults={"batch_size": 2})


class _PlacementProbe(tune.Callback):
    """On each group's first result: the placement group its AdapterGroup actor runs in."""

    def __init__(self) -> None:
        self.pg_of: dict[str, str] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = result.get("alto_group")
        if name and name not in self.pg_of:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            self.pg_of[name] = ray.get(actor.__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_placement_group_id()))


def _run(env: dict, task: LoRATask, samples: int, out: dict, **kw: Any) -> threading.Thread:
    probe = _PlacementProbe()

    def body() -> None:
        try:
            out["grid"] = run_tenant(task, {"lr": tune.grid_search([1e-3, 3e-3][:samples])},
                                     tune.TuneConfig(metric="loss", mode="min"),
                                     tune.RunConfig(name=task.task_name, storage_path=env["results"], verbose=0,
                                                    callbacks=[probe]),
                                     on_tenant=lambda t: out.update(tenant=t), coordinator_options=env["coord"], poll_s=0.5, **kw)
        except BaseException as err:  # surfaced by the test thread
            out["error"] = err
        out["probe"] = probe.pg_of
        out["pgs"] = {f"alto:{task.task_name}:g{g.group_index}": g.placement_group.id.hex()
                      for g in out["tenant"].grants}

    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th


def _finished(env: dict) -> dict:
    return ray.get(get_coordinator(**env["coord"]).finished_results.remote())


def test_backbone_too_big_fails_before_anything_runs(env, tmp_path) -> None:
    from transformers import LlamaConfig

    path = str(tmp_path / "llama-huge")       # config only: sizing never loads weights
    LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(path)
    task = LoRATask(model=path, dataset=env["data"], name="huge-405b", max_steps=5)
    before = len(ray.util.placement_group_table())
    with pytest.raises(ValueError, match=r"huge-405b.*does not fit any GPU"):
        run_tenant(task, {"lr": 1e-3}, tune.TuneConfig(num_samples=2), coordinator_options=env["coord"])
    small = _task(env, "small", "too-wide", 5)           # a group wider than any node
    with pytest.raises(ValueError, match=r"too-wide.*wants 4 GPUs per group"):
        run_tenant(small, {"lr": 1e-3}, tune.TuneConfig(num_samples=2), coordinator_options=env["coord"],
                   gpus_per_group=4)
    assert len(ray.util.placement_group_table()) == before
    assert "huge-405b" not in ray.get(get_coordinator(**env["coord"]).status.remote())


def test_two_tenants_with_different_backbones_run_in_their_granted_groups(env) -> None:
    a, b = {}, {}
    threads = [_run(env, _task(env, "small", "mt-small", 6), 2, a, max_groups=1),
               _run(env, _task(env, "large", "mt-large", 6), 2, b, max_groups=1)]
    for th in threads:
        th.join(timeout=120)
    for out in (a, b):
        assert "error" not in out, out.get("error")
        grid = out["grid"]
        assert len(grid) == 2 and grid.num_errors == 0
        assert all(r.metrics["step"] == 6 for r in grid)
        assert out["probe"] and out["probe"] == out["pgs"]       # each group ran in its granted bundle
    assert set(a["pgs"].values()).isdisjoint(b["pgs"].values())
    table = ray.util.placement_group_table()
    assert all(table[pg]["state"] == "REMOVED" for pg in [*a["pgs"].values(), *b["pgs"].values()])
    done = _finished(env)
    for name in ("mt-small", "mt-large"):
        res = done[name]["results"]
        assert res["num_trials"] == 2 and res["best_config"]["lr"] in (1e-3, 3e-3) and res["checkpoint"]


def test_late_tenant_queued_then_granted_across_a_coordinator_restart(env) -> None:
    """The cluster is full (a 2-slot group: 2 gloo ranks), a second tenant queues; the coordinator is killed
    mid-run: the running group keeps training, the tenants re-create it and re-register, the
    queued one is granted once the first finishes, and every finished result survives."""
    first, late = {}, {}
    th1 = _run(env, _task(env, "small", "mt-full", 60), 1, first, gpus_per_group=2)   # takes both slots
    deadline = time.time() + 120
    while getattr(first.get("tenant"), "granted_at", None) is None:
        assert time.time() < deadline and "error" not in first, first.get("error")
        time.sleep(0.1)
    th2 = _run(env, _task(env, "large", "mt-late", 4), 1, late)
    while not getattr(late.get("tenant"), "waits", None):
        assert time.time() < deadline and "error" not in late, late.get("error")
        time.sleep(0.1)
    group = "alto:mt-full:g0"
    while True:                                             # wait until the first group is training
        assert time.time() < deadline and "error" not in first, first.get("error")
        try:
            if ray.get(ray.get_actor(group, namespace=NAMESPACE).describe.remote())["steps"] >= 2:
                break
        except ValueError:
            pass
        time.sleep(0.2)
    handle = ray.get_actor(group, namespace=NAMESPACE)
    coord = get_coordinator(**env["coord"])
    ray.get(coord.task_finished.remote("mt-earlier", {"best_loss": 1.5}))     # a finished tenant
    earlier = _finished(env)
    steps_at_kill = ray.get(handle.describe.remote())["steps"]
    ray.kill(coord)
    while ray.get(handle.describe.remote())["steps"] <= steps_at_kill:         # the group keeps training
        assert time.time() < deadline + 30
        time.sleep(0.2)
    th1.join(timeout=150)
    th2.join(timeout=150)
    assert "error" not in first and "error" not in late, (first.get("error"), late.get("error"))
    assert first["tenant"].reconnects + late["tenant"].reconnects >= 1          # a tenant brought it back
    assert first["grid"].num_errors == 0 and all(r.metrics["step"] == 60 for r in first["grid"])
    assert first["probe"] == first["pgs"] and late["probe"] == late["pgs"]
    waited = late["tenant"].waits
    assert waited and waited[0]["position"] == 1                                # queued, not refused
    done = _finished(env)
    # Granted once the first tenant's training ended: its group may be released (no adapters
    # left) a moment before its Tuner returns and reports task_finished, so compare with the last
    # result (Tune's timestamp is whole seconds).
    first_trained_until = max(r.metrics["timestamp"] for r in first["grid"])
    assert first_trained_until - 1.0 <= late["tenant"].granted_at <= done["mt-full"]["finished_at"] + 15.0
    assert set(earlier) <= set(done) and done["mt-earlier"]["results"] == {"best_loss": 1.5}
    assert done["mt-late"]["results"]["num_trials"] == 1 and late["grid"].num_errors == 0
    assert os.path.exists(env["coord"]["state_path"])
