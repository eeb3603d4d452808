"""The coordinator: one detached, named Ray actor per cluster that every tenant registers with.

It keeps the picture (nodes, queued / running / finished tasks), re-plans with the CP-SAT
allocator when the picture changes, and grants a task its groups as placement groups when the
plan starts it now; otherwise the tenant is told to wait (with its queue position).

Placement groups are created `lifetime="detached"` and named `alto:<task>:<group>`, so a
coordinator restart does not take running groups down; the finished-results registry and the
running groups are persisted to a small JSON file (head node) and reloaded on start.
Running groups are never moved at runtime (migration would need the trainable to checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group

from alto_ray.cluster.allocator import Allocator
from alto_ray.cluster.allocator_problem import check_memory
from alto_ray.cluster.plan import GIB, NodeSpec, Plan, RunningGroup, TaskSpec
from alto_ray.cluster.predict import DurationPredictor

COORDINATOR_NAME = "alto:coordinator"
COORDINATOR_NAMESPACE = "alto"
DEFAULT_STATE_PATH = "~/.alto/coordinator_state.json"
DEFAULT_GPU_MEMORY_GB = 80.0
GPU_MEMORY_RESOURCE = "alto_gpu_memory_gb"     # optional per-node custom resource: GiB per GPU
_ACCELERATOR_GB = {"H100": 80, "H200": 141, "A100": 80, "A100-40G": 40, "A100-80G": 80, "L4": 24, "A10G": 24,
                   "L40S": 48, "B200": 180, "V100": 16, "T4": 16}


@dataclass
class GroupGrant:
    """One granted group: its placement group and where the plan put it."""

    task_id: str
    group_index: int
    node: str
    gpu_ids: tuple[int, ...]
    placement_group: Any
    pg_name: str
    bundles: list[dict[str, float]]
    strategy: str
    started_at: float
    planned_end: float


@dataclass
class _Entry:
    spec: TaskSpec
    status: str = "queued"                     # queued | running | finished
    order: int = 0
    groups: dict[int, GroupGrant] = field(default_factory=dict)
    progress: bool = False                     # has reported measured progress
    measured_at: tuple[float, float] | None = None   # (when, predicted remaining s) at the first measured step


class Coordinator:
    """Coordinator logic; `CoordinatorActor` is this class as a Ray actor."""

    def __init__(self, state_path: str | None = None, nodes: list[NodeSpec] | None = None,
                 gpu_memory_gb: float | None = None, cpus_per_gpu: float = 1, time_limit_s: float = 2.0,
                 objective: str = "makespan", cpu_slots_per_node: int | None = None,
                 predictor: DurationPredictor | None = None, replan_after_s: float = 15.0) -> None:
        self.state_path = Path(os.path.expanduser(state_path or DEFAULT_STATE_PATH))
        self.cpus_per_gpu = cpus_per_gpu
        self.replan_after_s = replan_after_s     # a plan ages (running groups near their end): refresh
        self.nodes, self.use_gpu = (list(nodes), True) if nodes else _discover_nodes(gpu_memory_gb,
                                                                                     cpu_slots_per_node)
        self.allocator = Allocator(self.nodes, time_limit_s=time_limit_s, objective=objective)
        self.predictor = predictor or DurationPredictor()
        self.tasks: dict[str, _Entry] = {}
        self.finished: dict[str, dict] = {}
        self._plan: Plan | None = None
        self._plan_at = 0.0
        self._dirty = True
        self._counter = 0
        self._load()

    # -- tenant API ----------------------------------------------------------------------------------
    def register_task(self, spec: TaskSpec) -> str:
        """Register (or re-register: idempotent by name) a task; ValueError if it fits no node."""
        check_memory(spec, self.nodes)
        if spec.name in self.finished:
            return spec.name
        entry = self.tasks.get(spec.name)
        if entry is None:
            self._counter += 1
            self.tasks[spec.name] = entry = _Entry(spec, order=self._counter)
        else:
            entry.spec = spec
        self.predictor.register_spec(spec)
        self._dirty = True
        return spec.name

    def request_groups(self, task_id: str) -> dict:
        """{"status": "granted", "groups": [GroupGrant]} | {"status": "wait", "position", "eta_s"}
        | {"status": "finished", "results"}."""
        if task_id in self.finished:
            return {"status": "finished", "results": self.finished[task_id].get("results")}
        entry = self._entry(task_id)
        if entry.status == "running":
            return {"status": "granted", "groups": sorted(entry.groups.values(), key=lambda g: g.group_index)}
        plan = self.plan()
        mine = plan.for_task(task_id)
        if mine and all(a.start <= plan.time_unit_s for a in mine):
            return {"status": "granted", "groups": self._grant(entry, plan)}
        waiting = sorted((plan.task_start(t) or 0.0, e.order, t) for t, e in self.tasks.items()
                         if e.status == "queued")
        position = 1 + [t for *_x, t in waiting].index(task_id)
        return {"status": "wait", "position": position, "eta_s": plan.task_start(task_id)}

    def report_progress(self, task_id: str, step_time: float, remaining_adapter_steps: int, *,
                        tokens_per_step: int | None = None, adapters_in_group: int | None = None,
                        max_trial_remaining_steps: int | None = None) -> float:
        """Feed a measured group step and the remaining work; returns the predicted remaining s."""
        entry = self._entry(task_id)
        before = self._remaining(entry)
        self.predictor.observe_step(task_id, step_time, tokens_per_step=tokens_per_step,
                                    adapters_in_group=adapters_in_group)
        self.predictor.set_remaining(task_id, remaining_adapter_steps, max_trial_remaining_steps)
        entry.progress = entry.progress or step_time > 0    # measured: the predictor has a step time
        after = self._remaining(entry)
        if entry.measured_at is None and step_time > 0:
            entry.measured_at = (time.time(), after)
        if abs(after - before) > 0.1 * max(before, 1.0):    # early exits shrink work: re-plan
            self._dirty = True
        return after

    def release(self, task_id: str, group: int) -> None:
        """Give back one group (e.g. early exits left fewer adapters than groups)."""
        entry = self._entry(task_id)
        g = entry.groups.pop(group, None)
        if g is not None:
            _remove_pg(g.placement_group)
        if not entry.groups and entry.status == "running":
            entry.status = "queued"
        self._dirty = True
        self._save()

    def task_finished(self, task_id: str, results_summary: Any = None) -> None:
        """Free the task's groups and record its results (persisted)."""
        entry = self.tasks.pop(task_id, None)
        if entry is not None:
            for g in entry.groups.values():
                _remove_pg(g.placement_group)
        predicted = self.predictor.predicted_at_start(task_id)
        err = self.predictor.mark_finished(task_id)
        now = time.time()
        self.finished[task_id] = {"results": results_summary, "finished_at": now,
                                  "predicted_s": predicted, "relative_error": err}
        if entry is not None and entry.measured_at is not None:     # how good the online correction was
            at, left = entry.measured_at
            self.finished[task_id].update(measured_predicted_s=left, measured_actual_s=now - at,
                                          measured_relative_error=(left - (now - at)) / max(now - at, 1e-9))
        self.predictor.forget(task_id)
        self._dirty = True
        self._save()

    def adopt(self, task_id: str, groups: list[GroupGrant]) -> bool:
        """Re-attach a tenant's running groups after a restart that lost them (no state file):
        those whose placement group still exists become running again; True if any did."""
        entry = self._entry(task_id)
        if entry.status == "running":
            return False
        names = {n.name for n in self.nodes}
        live = {g.group_index: g for g in groups if g.node in names and _lookup_pg(g.pg_name) is not None}
        if not live:
            return False
        entry.groups, entry.status, self._dirty = live, "running", True
        self._save()
        return True

    def withdraw(self, task_id: str) -> None:
        """A tenant gives up (its Tuner failed): free its groups, record nothing."""
        entry = self.tasks.pop(task_id, None)
        if entry is not None:
            for g in entry.groups.values():
                _remove_pg(g.placement_group)
        self.predictor.forget(task_id)
        self._dirty = True
        self._save()

    # -- views -----------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """The current plan (times relative to now); re-planned when the picture changed."""
        stale = self.replan_after_s > 0 and time.time() - self._plan_at > self.replan_after_s
        if self._dirty or self._plan is None or stale:
            self._replan()
        return self._plan

    def describe(self) -> str:
        return self.plan().describe()

    def status(self) -> dict[str, str]:
        out = {t: e.status for t, e in self.tasks.items()}
        out.update({t: "finished" for t in self.finished})
        return out

    def finished_results(self) -> dict[str, dict]:
        return dict(self.finished)

    def metrics(self) -> dict:
        counts = {s: sum(e.status == s for e in self.tasks.values()) for s in ("queued", "running")}
        p = self._plan
        tasks = {t: {"status": e.status, "groups": len(e.groups), "measured": e.measured_at is not None,
                     "adapter_step_s": self.predictor.adapter_step_s(t) if t in self.predictor else None,
                     "predicted_remaining_s": self._remaining(e)} for t, e in self.tasks.items()}
        return {**counts, "finished": len(self.finished), "nodes": len(self.nodes), "tasks": tasks,
                "gpus": sum(n.num_gpus for n in self.nodes), "use_gpu": self.use_gpu,
                "prediction_error": self.predictor.error_stats(),
                "prediction_error_measured": _measured_error_stats(self.finished),
                "plan": None if p is None else {"status": p.status, "makespan_s": p.makespan_s,
                                                "lower_bound_s": p.lower_bound_s, "solve_seconds": p.solve_seconds}}

    def nodes_view(self) -> list[NodeSpec]:
        return list(self.nodes)

    # -- internals -------------------------------------------------------------------------------------
    def _entry(self, task_id: str) -> _Entry:
        if task_id not in self.tasks:
            raise KeyError(f"task {task_id!r} is not registered (register_task first)")
        return self.tasks[task_id]

    def _remaining(self, entry: _Entry) -> float:
        """Predicted remaining seconds: from measurements once reported, else the plan's end."""
        n = max(len(entry.groups), 1)
        if entry.progress or entry.status != "running":
            return self.predictor.apply(dataclasses.replace(entry.spec)).duration_s(n)
        return max(max(g.planned_end for g in entry.groups.values()) - time.time(), 1.0)

    def _replan(self) -> None:
        specs, running = [], []
        for name, e in self.tasks.items():
            spec = self.predictor.apply(dataclasses.replace(e.spec))
            specs.append(spec)
            if e.status == "running":
                left = self._remaining(e)
                running += [RunningGroup(name, g.group_index, g.node, g.gpu_ids, left) for g in e.groups.values()]
        self._plan = self.allocator.plan(specs, running)
        self._plan_at = time.time()
        self._dirty = False

    def _grant(self, entry: _Entry, plan: Plan) -> list[GroupGrant]:
        now = time.time()
        name = entry.spec.name
        bundles = {(b.task_id, b.group_index): b for b in
                   plan.to_placement_bundles(self.cpus_per_gpu, use_gpu=self.use_gpu)}
        for a in plan.for_task(name):
            b = bundles[(a.task_id, a.group_index)]
            pg_name = f"alto:{name}:{a.group_index}"
            pg = _create_pg(b.bundles, b.strategy, pg_name, b.ray_node_id)
            entry.groups[a.group_index] = GroupGrant(name, a.group_index, a.node, a.gpu_ids, pg, pg_name,
                                                     b.bundles, b.strategy, now, now + (a.end - a.start))
        entry.status = "running"
        mine = plan.for_task(name)
        self.predictor.mark_started(name, len(entry.groups), now, predicted_s=mine[0].end - mine[0].start)
        self._dirty = True
        self._save()
        return sorted(entry.groups.values(), key=lambda g: g.group_index)

    def _save(self) -> None:
        """Atomically write finished results and running groups (JSON; results via str if needed)."""
        running = {t: {"spec": dataclasses.asdict(e.spec), "order": e.order,
                       "groups": [{"group_index": g.group_index, "node": g.node, "gpu_ids": list(g.gpu_ids),
                                   "pg_name": g.pg_name, "bundles": g.bundles, "strategy": g.strategy,
                                   "started_at": g.started_at, "planned_end": g.planned_end}
                                  for g in e.groups.values()]}
                   for t, e in self.tasks.items() if e.status == "running"}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "finished": self.finished, "running": running},
                                  indent=1, default=str))
        os.replace(tmp, self.state_path)

    def _load(self) -> None:
        """Reload finished results; re-adopt running groups whose placement groups still exist."""
        if not self.state_path.exists():
            return
        data = json.loads(self.state_path.read_text())
        self.finished = dict(data.get("finished", {}))
        for name, r in data.get("running", {}).items():
            groups = {}
            for g in r["groups"]:
                pg = _lookup_pg(g["pg_name"])
                if pg is not None:
                    groups[g["group_index"]] = GroupGrant(name, g["group_index"], g["node"], tuple(g["gpu_ids"]),
                                                          pg, g["pg_name"], g["bundles"], g["strategy"],
                                                          g["started_at"], g["planned_end"])
            if groups and name not in self.finished and all(x.node in {n.name for n in self.nodes}
                                                            for x in groups.values()):
                spec = TaskSpec(**{k: v for k, v in r["spec"].items()})
                self._counter = max(self._counter, r.get("order", 0))
                self.tasks[name] = _Entry(spec, "running", r.get("order", 0), groups)
                self.predictor.register_spec(spec)


CoordinatorActor = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)


def get_coordinator(**kwargs: Any) -> Any:
    """The cluster's coordinator actor, created on first use (kwargs only count then).

    Pinned to the head node when Ray exposes `node:__internal_head__`, so its state file lives there.
    """
    opts: dict[str, Any] = dict(name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached",
                                get_if_exists=True)
    if "node:__internal_head__" in ray.cluster_resources():
        opts["resources"] = {"node:__internal_head__": 0.001}
    return CoordinatorActor.options(**opts).remote(**kwargs)


def _measured_error_stats(finished: dict[str, dict]) -> dict:
    """Error of the remaining-time prediction made at each task's first measured step."""
    errs = [r["measured_relative_error"] for r in finished.values() if r.get("measured_relative_error") is not None]
    return {"count": len(errs), "mean_abs_rel_error": sum(map(abs, errs)) / len(errs) if errs else None,
            "mean_rel_error": sum(errs) / len(errs) if errs else None}


def _discover_nodes(gpu_memory_gb: float | None, cpu_slots_per_node: int | None) -> tuple[list[NodeSpec], bool]:
    """Alive nodes from ray.nodes(); CPU slots stand in for GPUs on a CPU-only cluster."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    use_gpu = any(n["Resources"].get("GPU", 0) >= 1 for n in alive)
    nodes, seen = [], set()
    for n in sorted(alive, key=lambda n: (n["NodeManagerAddress"], n["NodeID"])):
        res = n["Resources"]
        count = int(res.get("GPU", 0)) if use_gpu else int(cpu_slots_per_node or res.get("CPU", 0))
        if count < 1:
            continue
        name = n["NodeManagerAddress"]
        if name in seen:
            name = f"{name}/{n['NodeID'][:8]}"
        seen.add(name)
        nodes.append(NodeSpec(name, count, int(_gpu_memory_gb(res, gpu_memory_gb) * GIB), n["NodeID"]))
    if not nodes:
        raise RuntimeError("no alive Ray node with a GPU or CPU to plan on")
    return nodes, use_gpu


def _gpu_memory_gb(res: dict[str, float], override: float | None) -> float:
    """Override > node resource alto_gpu_memory_gb > accelerator_type table > 80 GiB."""
    if override:
        return float(override)
    if res.get(GPU_MEMORY_RESOURCE):
        return float(res[GPU_MEMORY_RESOURCE])
    for key in res:
        if key.startswith("accelerator_type:") and key.split(":", 1)[1] in _ACCELERATOR_GB:
            return float(_ACCELERATOR_GB[key.split(":", 1)[1]])
    return DEFAULT_GPU_MEMORY_GB


def _create_pg(bundles: list[dict[str, float]], strategy: str, name: str, node_id: str | None) -> Any:
    old = _lookup_pg(name)
    if old is not None:
        _remove_pg(old)
    kwargs: dict[str, Any] = dict(strategy=strategy, name=name, lifetime="detached")
    if node_id and strategy == "STRICT_PACK":
        kwargs["_soft_target_node_id"] = node_id
    try:
        return placement_group(bundles, **kwargs)
    except (TypeError, ValueError):
        kwargs.pop("_soft_target_node_id", None)
        return placement_group(bundles, **kwargs)


def _lookup_pg(name: str) -> Any:
    try:
        return get_placement_group(name)
    except ValueError:
        return None


def _remove_pg(pg: Any) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already gone (owner died, removed twice): nothing to free
        pass
