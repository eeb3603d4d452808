"""The coordinator: one detached, named Ray actor per cluster that every tenant registers with.

It keeps the picture (nodes, queued / running / finished tasks), re-plans with the CP-SAT
allocator when the picture changes, and grants a task its groups as placement groups when the
plan starts it now; otherwise the tenant is told to wait (with its queue position).

Placement groups are created `lifetime="detached"` and named `alto:<task>:<group>`, so a
coordinator restart does not take running groups down; the finished-results registry, the
running groups and the queue (its order) are persisted to a small JSON file (head node,
`coordinator_state.py`) and reloaded on start.
Running groups are never moved at runtime (migration would need the trainable to checkpoint).

Unless given fixed `nodes=`, it re-reads the alive nodes whenever it plans (`nodes.py`): a node
that joined is planned on, the groups of a node that died are released (a task left with none
queues again; finished results are untouched) and the loss is recorded for the task's tenant
(`node_loss.py`: `node_losses()`, `metrics()`, `describe()`). Worker types the autoscaler can
start count as potential nodes, planned busy for `autoscale_delay_s`; a plan using them is only
kept when it ends at least `autoscale_gain` sooner than the plan over the nodes up (no node
started for nothing). A queued task that fits no node now (its only large node died) is left out
of the plan and reported, not planned, until one fits (`unfit.py`). A task whose tenant's driver
died (its Ray job is dead) is abandoned: its groups are freed, its published placement dropped and
the next tenant granted (`liveness.py`). Its reads of Ray's node and job tables give up after a
few seconds and count as unknown (`gcs.py`): a slow GCS must not hold every tenant's call. The
actor is pinned to the head node (`get_coordinator`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Collection

import ray

from alto_ray.cluster import coordinator_state, gcs, liveness, unfit
from alto_ray.cluster.allocator import Allocator
from alto_ray.cluster.allocator_problem import check_memory
from alto_ray.cluster.coordinator_state import GroupGrant, TaskEntry
from alto_ray.cluster.node_loss import NodeLoss, NodeLossLog, drop_grant
from alto_ray.cluster.nodes import (DEFAULT_GPU_MEMORY_GB, GPU_MEMORY_RESOURCE, alive_node_specs,  # noqa: F401
                                    alive_ray_nodes, create_pg, gpu_mode, gpu_worker_types, is_potential, on_head_node,
                                    potential_hosts, potential_node_specs, rehome, remove_pg, startup_background)
from alto_ray.cluster.plan import InfeasibleTaskError, NodeSpec, Plan, RunningGroup, TaskSpec
from alto_ray.cluster.predict import DurationPredictor, measured_error_stats
from alto_ray.tune.capacity import driver_bootstrap_config

COORDINATOR_NAME = "alto:coordinator"
COORDINATOR_NAMESPACE = "alto"
DEFAULT_STATE_PATH = "~/.alto/coordinator_state.json"


class Coordinator:
    """Coordinator logic; `CoordinatorActor` is this class as a Ray actor."""

    def __init__(self, state_path: str | None = None, nodes: list[NodeSpec] | None = None,
                 gpu_memory_gb: float | None = None, cpus_per_gpu: float = 1, time_limit_s: float = 2.0,
                 objective: str = "makespan", cpu_slots_per_node: int | None = None,
                 predictor: DurationPredictor | None = None, replan_after_s: float = 15.0,
                 autoscale_delay_s: float = 300.0, autoscale_gain: float = 0.05,
                 bootstrap_config: str | None = None,
                 liveness_check_s: float | None = liveness.DEFAULT_CHECK_S) -> None:
        self.state_path = Path(os.path.expanduser(state_path or DEFAULT_STATE_PATH))
        self.cpus_per_gpu = cpus_per_gpu
        self.replan_after_s = replan_after_s     # a plan ages (running groups near their end): refresh
        self.autoscale_delay_s = autoscale_delay_s   # planned start time of a node the autoscaler starts
        self.autoscale_gain = autoscale_gain     # how much sooner a plan must end to start nodes
        self._time_limit_s, self._objective = time_limit_s, objective
        self._gpu_memory_gb, self._cpu_slots = gpu_memory_gb, cpu_slots_per_node
        self._fixed = bool(nodes)                # explicit nodes (tests, benchmarks): never re-read
        self.bootstrap_config = bootstrap_config   # the launcher's config; None: env / the head's default
        self.losses = NodeLossLog()
        self.liveness = liveness.LivenessWatch(liveness_check_s)
        self.nodes, self.use_gpu, self.potential = list(nodes or []), True, set()
        self._alive_ids: frozenset[str] | None = None
        self.nodes_readable = True               # the last read of Ray's node table answered in time
        self._types: list = []
        self._ready: dict[str, float] = {}       # potential node -> s until it can be up
        self.tasks: dict[str, TaskEntry] = {}
        self._unfit: dict[str, str] = {}         # queued task -> why it fits no node now (not planned)
        self._refresh_nodes(force=True)
        if not self.nodes:
            raise RuntimeError("no alive Ray node with a GPU or CPU to plan on")
        self.allocator = Allocator(self.nodes, time_limit_s=time_limit_s, objective=objective)
        self.predictor = predictor or DurationPredictor()
        self.finished: dict[str, dict] = {}
        self._plan: Plan | None = None
        self._plan_at = 0.0
        self._dirty = True
        self._counter = 0
        self._load()
        self._refresh_nodes(force=True)          # keep potential nodes that hold reloaded groups
        self.liveness.sweep(self.tasks, self._abandon, force=True, on_restart=True)   # drivers that died meanwhile
        liveness.start_ticker(liveness_check_s)  # as the actor: a dead tenant's groups go even if nobody calls

    # -- tenant API ----------------------------------------------------------------------------------
    def register_task(self, spec: TaskSpec, requeue: bool = False, job_id: str | None = None,
                      grant_key: str | None = None) -> str:
        """Register (or re-register: idempotent by name) a task; ValueError if a new one fits no
        node, alive or one the autoscaler can start. `requeue`: a tenant registered before (this
        coordinator restarted): its task fit then, so it queues, blocked until a node fits.
        `job_id`: the Ray job of the tenant's driver; once it is dead the task is abandoned.
        `grant_key`: where the tenant publishes its placement (Ray's KV store), dropped then."""
        try:
            if not requeue and spec.name not in self.tasks:
                check_memory(spec, self.nodes_view())
        except InfeasibleTaskError as err:
            raise InfeasibleTaskError(f"{err}; {unfit.capacity(self.nodes, self.potential)}") from None
        if spec.name in self.finished:
            return spec.name
        entry = self.tasks.get(spec.name)
        if entry is None:
            self._counter += 1
            self.tasks[spec.name] = entry = TaskEntry(spec, order=self._counter)
        else:
            entry.spec = spec
        entry.job_id, entry.grant_key = job_id, grant_key   # the driver registering last owns the task
        self.predictor.register_spec(spec)
        self._dirty = True
        self._save()                             # a queued task keeps its place across a restart
        return spec.name

    def request_groups(self, task_id: str) -> dict:
        """{"status": "granted", "groups": [GroupGrant]} | {"status": "wait", "position", "eta_s"}
        (+ "reason" while the task fits no node) | {"status": "finished", "results"}."""
        if task_id in self.finished:
            return {"status": "finished", "results": self.finished[task_id].get("results")}
        entry = self._entry(task_id)
        if entry.status == "running":
            return self.losses.tag(task_id, {"status": "granted", "groups": sorted(
                entry.groups.values(), key=lambda g: g.group_index)})
        plan = self.plan()
        mine = plan.for_task(task_id)
        if mine and self._startable(plan, task_id):
            return self.losses.tag(task_id, {"status": "granted", "groups": self._grant(entry, plan)})
        queued = {t: e.order for t, e in self.tasks.items() if e.status == "queued"}
        answer = {"status": "wait", "position": unfit.queue_position(plan, queued, self._unfit, task_id),
                  "eta_s": plan.task_start(task_id)}
        if task_id in self._unfit:
            answer["reason"] = self._unfit[task_id]
        return self.losses.tag(task_id, answer)

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
            remove_pg(g.placement_group)
        if not entry.groups and entry.status == "running":
            entry.status = "queued"
        self._dirty = True
        self._save()

    def task_finished(self, task_id: str, results_summary: Any = None) -> None:
        """Free the task's groups and record its results (persisted)."""
        entry = self.tasks.pop(task_id, None)
        if entry is not None:
            for g in entry.groups.values():
                remove_pg(g.placement_group)
        predicted = self.predictor.predicted_at_start(task_id)
        err = self.predictor.mark_finished(task_id)
        now = time.time()
        self.finished[task_id] = {"results": results_summary, "finished_at": now,
                                  "predicted_s": predicted, "relative_error": err}
        if task_id in self.losses.by_task:
            self.finished[task_id]["node_losses"] = self.losses.pop(task_id)
        if entry is not None and entry.measured_at is not None:     # how good the online correction was
            at, left = entry.measured_at
            self.finished[task_id].update(measured_predicted_s=left, measured_actual_s=now - at,
                                          measured_relative_error=(left - (now - at)) / max(now - at, 1e-9))
        self.predictor.forget(task_id)
        self._dirty = True
        self._save()

    def adopt(self, task_id: str, groups: list[GroupGrant]) -> bool:
        """Re-attach a tenant's running groups after a restart that lost them (no state file):
        those on a node up whose placement group still exists become running again; True if any
        did. Those whose node died meanwhile are recorded lost, once (`NodeLossLog.reattach`)."""
        entry = self._entry(task_id)
        if entry.status == "running":
            return False
        live = self.losses.reattach(task_id, list(groups), self.nodes_view())   # records groups lost meanwhile
        if not live:
            self._save()
            return False
        entry.groups, entry.status, self._dirty = live, "running", True
        self._save()
        self._refresh_nodes(force=True)          # a potential node holding a group stays planned
        return True

    def withdraw(self, task_id: str) -> None:
        """A tenant gives up (its Tuner failed): free its groups, record nothing."""
        entry = self.tasks.pop(task_id, None)
        if entry is not None:
            for g in entry.groups.values():
                remove_pg(g.placement_group)
        self.predictor.forget(task_id)
        self.losses.pop(task_id)
        self._dirty = True
        self._save()

    def _abandon(self, task_id: str) -> None:
        """Its tenant's driver died: withdraw the task for it, and drop the placement it published
        (the tenant drops it when it finishes or withdraws; a dead one never will)."""
        key = self.tasks[task_id].grant_key
        if key:
            drop_grant(key)
        self.withdraw(task_id)

    def check_liveness(self, force: bool = False) -> list[liveness.Abandonment]:
        """Abandon the tasks whose tenant's driver job died: free their groups, drop them from the
        plan, record it. Reads Ray's job table at most every `liveness_check_s` unless `force`."""
        return self.liveness.sweep(self.tasks, self._abandon, force)

    def node_losses(self, task_id: str | None = None) -> list[NodeLoss]:
        """Groups lost with their node (of one task, or all). Re-reads the nodes first, so a
        tenant polling this learns of a dead node even when nothing else makes a plan."""
        self._refresh_nodes()
        return self.losses.of(task_id)

    # -- views -----------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """The current plan (times relative to now); re-planned when the picture changed."""
        self._refresh_nodes()
        stale = self.replan_after_s > 0 and time.time() - self._plan_at > self.replan_after_s
        self.check_liveness(force=self._dirty or self._plan is None or stale)   # never plan a dead tenant's task
        if self._dirty or self._plan is None or stale:
            self._replan()
        return self._plan

    def describe(self) -> str:
        return self.plan().describe() + unfit.describe(self._unfit) + self.losses.describe() + self.liveness.describe()

    def status(self) -> dict[str, str]:
        """Task -> queued | blocked (queued, fits no node now) | running | finished | abandoned."""
        self._refresh_nodes()
        self.check_liveness()
        blocked = self._check_fit()
        out = self.liveness.statuses()
        out.update({t: unfit.BLOCKED if t in blocked else e.status for t, e in self.tasks.items()})
        out.update({t: "finished" for t in self.finished})
        return out

    def finished_results(self) -> dict[str, dict]:
        return dict(self.finished)

    def metrics(self) -> dict:
        status, p = self.status(), self._plan
        counts = {s: sum(status[t] == s for t in self.tasks) for s in ("queued", unfit.BLOCKED, "running")}
        tasks = {t: {"status": status[t], "groups": len(e.groups), "measured": e.measured_at is not None,
                     "adapter_step_s": self.predictor.adapter_step_s(t) if t in self.predictor else None,
                     "predicted_remaining_s": self._remaining(e), "job_id": e.job_id,
                     **({"reason": self._unfit[t]} if t in self._unfit else {})} for t, e in self.tasks.items()}
        up = [n for n in self.nodes if n.name not in self.potential]
        return {**counts, "finished": len(self.finished), "nodes": len(up), "tasks": tasks,
                "gpus": sum(n.num_gpus for n in up), "use_gpu": self.use_gpu,
                "potential_nodes": sorted(self.potential),
                "potential_gpus": sum(n.num_gpus for n in self.nodes if n.name in self.potential),
                "prediction_error": self.predictor.error_stats(),
                "prediction_error_measured": measured_error_stats(self.finished),
                "node_losses": self.losses.to_json(), "bootstrap_config": self.bootstrap_config,
                "abandoned": self.liveness.to_json(), "liveness": self.liveness.metrics(),
                "node_table_readable": self.nodes_readable,
                "on_node": ray.get_runtime_context().get_node_id(),
                "plan": None if p is None else {"status": p.status, "makespan_s": p.makespan_s,
                                                "lower_bound_s": p.lower_bound_s, "solve_seconds": p.solve_seconds}}

    def nodes_view(self) -> list[NodeSpec]:
        """The nodes planned on now: alive, then potential (`ray_node_id` None)."""
        self._refresh_nodes()
        return list(self.nodes)

    # -- internals -------------------------------------------------------------------------------------
    def _entry(self, task_id: str) -> TaskEntry:
        if task_id not in self.tasks:
            raise KeyError(f"task {task_id!r} is not registered (register_task first)")
        return self.tasks[task_id]

    def _remaining(self, entry: TaskEntry) -> float:
        """Predicted remaining seconds: from measurements once reported, else the plan's end."""
        n = max(len(entry.groups), 1)
        if entry.progress or entry.status != "running":
            return self.predictor.apply(dataclasses.replace(entry.spec)).duration_s(n)
        return max(max(g.planned_end for g in entry.groups.values()) - time.time(), 1.0)

    def _check_fit(self) -> dict[str, str]:
        """The queued tasks that fit no node planned on now, and why."""
        before, self._unfit = self._unfit, unfit.unfit_reasons(
            (e.spec for e in self.tasks.values() if e.status == "queued"), self.nodes, self.potential)
        unfit.note_changes(before, self._unfit)
        return self._unfit

    def _replan(self) -> None:
        """Plan the tasks that fit some node (a blocked one must not fail every tenant's call)."""
        specs, running = [], []
        blocked = self._check_fit()
        for name, e in self.tasks.items():
            if name not in blocked:
                specs.append(self.predictor.apply(dataclasses.replace(e.spec)))
            if e.status == "running":
                left = self._remaining(e)
                running += [RunningGroup(name, g.group_index, g.node, g.gpu_ids, left) for g in e.groups.values()]
        self._ready = {}
        if self.potential:
            self._plan = self._plan_with_potential(specs, running)
        else:
            self._plan = self.allocator.plan(specs, running)
        self._plan_at = time.time()
        self._dirty = False

    def _plan_with_potential(self, specs: list[TaskSpec], running: list[RunningGroup]) -> Plan:
        """Plan over the nodes up (and starting), and over all with potential ones; keep the plan
        with potential nodes only if a task needs them or it ends `autoscale_gain` sooner."""
        hosts = self._potential_hosts()
        background, self._ready = startup_background(
            [n for n in self.nodes if n.name in self.potential], hosts, self.autoscale_delay_s, time.time())
        up = [n for n in self.nodes if n.name not in self.potential or n.name in hosts]
        base = None
        if up and len(up) < len(self.nodes):
            try:
                base = Allocator(up, objective=self._objective).plan(
                    specs, running + [b for b in background if b.node in hosts], time_limit_s=self._time_limit_s / 2)
            except ValueError:                   # a task fits no node that is up: it needs a new one
                base = None
        full = self.allocator.plan(specs, running + background,
                                   time_limit_s=self._time_limit_s / 2 if base is not None else None)
        plan = full
        if base is not None and _last_end(full) >= (1 - self.autoscale_gain) * _last_end(base):
            plan = base
        plan.potential_nodes = sorted(self.potential)
        plan.start_delay_s = self.autoscale_delay_s
        return plan

    def _startable(self, plan: Plan, task_id: str) -> bool:
        """The plan starts the task now, or as soon as the potential node(s) it uses can be up
        while its GPUs on nodes up sit idle until then (its placement groups make the autoscaler
        start the node, so the grant must not wait for it)."""
        mine = plan.for_task(task_id)
        start = min(a.start for a in mine)
        if start <= plan.time_unit_s:
            return True
        ready = max(self._ready.get(a.node, 0.0) for a in mine)
        if ready <= 0 or start > ready + plan.time_unit_s:
            return False
        busy = {(b.node, g) for b in plan.assignments if b.task_id != task_id and b.start < start for g in b.gpu_ids}
        return not any((a.node, g) in busy for a in mine for g in a.gpu_ids)

    def _potential_hosts(self) -> dict[str, list[tuple[tuple[int, ...], float]]]:
        """Potential node -> (gpu ids, granted at) of the groups granted there, not placed yet."""
        return potential_hosts(g for e in self.tasks.values() for g in e.groups.values())

    def _refresh_nodes(self, force: bool = False) -> None:
        """Re-read the alive nodes (one GCS call; the rest only when the set of node ids changed or
        a group on a potential node got placed): new nodes join the plan, dead nodes leave it.
        A read the GCS does not answer in time (`gcs.bounded_read`) leaves the nodes as they were."""
        if self._fixed:
            return
        try:
            raw = gcs.bounded_read(gcs.NODES, alive_ray_nodes)
        except gcs.GcsReadTimeout:
            if not self.nodes:                   # nothing to go on yet (the coordinator is starting)
                raise
            self.nodes_readable = False          # unknown: plan on the nodes as they were
            return
        self.nodes_readable = True
        ids = frozenset(n["NodeID"] for n in raw)
        changed = (force or ids != self._alive_ids      # a blocked task: the launcher's config may gain a type
                   or (bool(self._unfit) and gpu_worker_types(self.bootstrap_config) != self._types))
        holding = any(e.groups for e in self.tasks.values())
        if changed:
            self._types = gpu_worker_types(self.bootstrap_config)   # re-read when nodes change
            if not holding:                      # the mode (GPU / CPU slots) only flips when idle
                self.use_gpu = gpu_mode(raw, self._types)
        names = {n.name: n.ray_node_id for n in self.nodes if n.ray_node_id}
        alive = alive_node_specs(raw, self.use_gpu, self._gpu_memory_gb, self._cpu_slots,
                                 {i: name for name, i in names.items()})
        if changed:                              # groups on a node that left: their actors are gone
            up = {(n.name, n.ray_node_id) for n in alive}
            self._release_where(lambda g: not is_potential(g.node) and (g.node, names.get(g.node)) not in up,
                                lost_with=names)
        moved = rehome([g for e in self.tasks.values() for g in e.groups.values()], alive)
        if moved:                                # groups on potential nodes got placed on `alive` ones
            self._save()
        if not (changed or moved):
            return
        potential = (potential_node_specs(raw, self._types, self._gpu_memory_gb, self._potential_hosts())
                     if self.use_gpu else [])
        kept = {n.name for n in potential}       # a worker type no longer launchable: its groups go
        self._release_where(lambda g: is_potential(g.node) and g.node not in kept)
        nodes = alive + potential
        if not nodes and holding and not any(e.groups for e in self.tasks.values()):
            self._refresh_nodes(force=True)      # all groups left with their nodes: pick the mode again
            return
        self._alive_ids = ids
        self._set_nodes(nodes, {n.name for n in potential})

    def _set_nodes(self, nodes: list[NodeSpec], potential: Collection[str] = ()) -> None:
        """Plan on these nodes from now on (`potential`: the names of those not up)."""
        self.nodes, self.potential = list(nodes), set(potential)
        self.allocator = Allocator(self.nodes, time_limit_s=self._time_limit_s, objective=self._objective)
        self._dirty = True

    def _release_where(self, gone: Callable[[GroupGrant], bool], lost_with: dict[str, str] | None = None) -> None:
        """Release the groups `gone` says; `lost_with` (node name -> id): they died with their
        node, so each task's loss is recorded for its tenant first."""
        for t, e in list(self.tasks.items()):
            hit = {gi: g for gi, g in e.groups.items() if gone(g)}
            if hit and lost_with is not None:
                self.losses.record(t, hit.values(), lost_with, requeued=len(hit) == len(e.groups))
            for gi in hit:
                self.release(t, gi)

    def _grant(self, entry: TaskEntry, plan: Plan) -> list[GroupGrant]:
        now = time.time()
        name = entry.spec.name
        bundles = {(b.task_id, b.group_index): b for b in
                   plan.to_placement_bundles(self.cpus_per_gpu, use_gpu=self.use_gpu)}
        mine = plan.for_task(name)
        wait = mine[0].start if mine[0].start > plan.time_unit_s else 0.0   # for a node to start
        for a in mine:
            b = bundles[(a.task_id, a.group_index)]
            pg_name = f"alto:{name}:{a.group_index}"
            pg = create_pg(b.bundles, b.strategy, pg_name, b.ray_node_id)
            end = now + a.end - (0.0 if wait else a.start)
            entry.groups[a.group_index] = GroupGrant(name, a.group_index, a.node, a.gpu_ids, pg, pg_name,
                                                     b.bundles, b.strategy, now, end, b.ray_node_id)
        entry.status = "running"
        self.predictor.mark_started(name, len(entry.groups), now + wait, predicted_s=mine[0].end - mine[0].start)
        self._dirty = True
        self._save()
        return sorted(entry.groups.values(), key=lambda g: g.group_index)

    def _save(self) -> None:
        """Write the state file (`coordinator_state`): a restarted coordinator carries on from it."""
        coordinator_state.save(self.state_path, self.tasks, self.finished, self.losses, self.liveness,
                               coordinator_state.ray_session())

    def _load(self) -> None:
        """Reload the state file, if any: finished results, the logs, and the tasks it held
        (running ones with the groups still up, queued again if all died with their node(s);
        `coordinator_state.load`)."""
        saved = coordinator_state.load(self.state_path, self.losses, self.liveness, self.nodes,
                                       coordinator_state.ray_session())
        if saved is None:
            return
        self.finished, self.tasks = saved
        self._counter = max((e.order for e in self.tasks.values()), default=0)
        for e in self.tasks.values():
            self.predictor.register_spec(e.spec)
        self._save()                             # what was re-attached; the groups lost meanwhile leave the file


CoordinatorActor = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)


def get_coordinator(**kwargs: Any) -> Any:
    """The cluster's coordinator actor, created on first use (kwargs only count then).

    Pinned to the head node, where its state file and the launcher's config live; it reads the
    config this driver's `ALTO_RAY_BOOTSTRAP_CONFIG` names (the actor does not see the driver's
    environment), unless `bootstrap_config=` says otherwise.
    """
    kwargs.setdefault("bootstrap_config", driver_bootstrap_config())
    return CoordinatorActor.options(name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached",
                                    get_if_exists=True, **on_head_node()).remote(**kwargs)


def _last_end(plan: Plan) -> float:
    """When the plan's last group ends (its makespan counts the potential nodes' start delay)."""
    return max((a.end for a in plan.assignments), default=0.0)
