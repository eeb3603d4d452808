"""Plan data: the allocator's inputs (nodes, tasks, running groups) and its output.

Kept free of OR-Tools and Ray so the coordinator, tests and tenants can build, print and
validate plans without a solver.  Sizes are bytes, times are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

GIB = 1024**3


class PlanError(ValueError):
    """A plan breaks an invariant (double-booked GPU, group split over nodes, ...)."""


class InfeasibleTaskError(ValueError):
    """A task cannot run on any node (too big for a GPU, or wants more GPUs than a node has)."""


@dataclass(frozen=True)
class NodeSpec:
    """One machine: `num_gpus` identical GPUs of `gpu_memory_bytes` each.

    `ray_node_id` (hex) lets the coordinator steer a group's placement group to this node.
    """

    name: str
    num_gpus: int
    gpu_memory_bytes: int = 80 * GIB
    ray_node_id: str | None = None


@dataclass
class TaskSpec:
    """One tuning task (one backbone, many trials = adapters) as the allocator sees it.

    `work_s` is the predicted remaining time on ONE group (remaining adapter-steps x seconds
    per adapter-step); with g groups the duration is max(work_s / g, min_duration_s), where
    `min_duration_s` is the critical path of the longest trial (its steps are sequential).
    Tasks that leave `work_s` unset get it from the `DurationPredictor` prior (coordinator).
    `max_groups` caps what the allocator may give; `requested_groups` is what the tenant asked
    for (the FCFS baseline grants exactly that; default max_groups).
    """

    name: str
    backbone_bytes: int
    adapter_bytes: int
    num_adapters: int
    gpus_per_group: int = 1
    max_groups: int | None = None
    requested_groups: int | None = None
    work_s: float | None = None
    min_duration_s: float = 0.0
    weight: float = 1.0
    arrival: float = 0.0
    # Inputs for the analytic duration prior (predict.py); optional.
    params: float | None = None
    tokens_per_adapter_step: int | None = None
    steps_per_adapter: int | None = None
    cpus_per_gpu: int = 1

    @property
    def task_id(self) -> str:
        return self.name

    def per_gpu_bytes(self) -> float:
        """Memory one GPU of a group needs for the backbone shard plus one adapter."""
        return self.backbone_bytes / self.gpus_per_group + self.adapter_bytes

    def adapters_per_group(self, gpu_memory_bytes: int) -> int:
        """How many adapters fit at once in one group (rank-local: adapters spread over ranks)."""
        free = gpu_memory_bytes - self.backbone_bytes / self.gpus_per_group
        if free < self.adapter_bytes:
            return 0
        return int(free // max(self.adapter_bytes, 1)) * self.gpus_per_group

    def duration_s(self, groups: int) -> float:
        """Predicted duration with `groups` groups running concurrently."""
        if self.work_s is None:
            raise ValueError(f"task {self.name!r} has no work_s (predicted work) set")
        return max(self.work_s / max(groups, 1), self.min_duration_s)

    def group_cap(self) -> int:
        """Most groups that can help: one adapter per group at most."""
        cap = self.num_adapters if self.max_groups is None else min(self.max_groups, self.num_adapters)
        return max(cap, 1)


@dataclass(frozen=True)
class RunningGroup:
    """A group already running: pinned to its GPUs for `remaining_s` more seconds."""

    task_id: str
    group_index: int
    node: str
    gpu_ids: tuple[int, ...]
    remaining_s: float


@dataclass(frozen=True)
class Assignment:
    """Group `group_index` of `task_id` runs on `gpu_ids` of `node` over [start, end) seconds."""

    task_id: str
    group_index: int
    node: str
    gpu_ids: tuple[int, ...]
    start: float
    end: float
    running: bool = False


@dataclass(frozen=True)
class GroupBundles:
    """Ray placement-group request for one group."""

    task_id: str
    group_index: int
    node: str
    bundles: list[dict[str, float]]
    strategy: str
    ray_node_id: str | None = None


@dataclass
class Plan:
    """The allocator's answer: who runs where and when, plus how good the answer is.

    `lower_bound_s` is the better of CP-SAT's proven bound and the analytic one
    (`bound_source` says which); `status` is CP-SAT's status name, or GREEDY_FALLBACK / FCFS.
    """

    assignments: list[Assignment]
    makespan_s: float
    objective: str = "makespan"
    objective_value: float = 0.0
    status: str = "UNKNOWN"
    solver: str = "cp-sat"
    lower_bound_s: float | None = None
    cp_sat_bound_s: float | None = None
    analytic_bound_s: float | None = None
    bound_source: str | None = None
    objective_bound: float | None = None
    detail: str = ""
    solve_seconds: float = 0.0
    wall_seconds: float = 0.0
    time_unit_s: float = 1.0
    migrated: list[str] = field(default_factory=list)
    node_gpus: dict[str, int] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)
    potential_nodes: list[str] = field(default_factory=list)   # not up: the autoscaler would start them
    start_delay_s: float = 0.0                 # how long the plan expects a potential node to start

    # -- queries ---------------------------------------------------------------------------
    def for_task(self, task_id: str) -> list[Assignment]:
        return sorted((a for a in self.assignments if a.task_id == task_id), key=lambda a: a.group_index)

    def groups(self) -> dict[str, int]:
        """Number of groups per task."""
        out: dict[str, int] = {}
        for a in self.assignments:
            out[a.task_id] = out.get(a.task_id, 0) + 1
        return out

    def task_start(self, task_id: str) -> float | None:
        starts = [a.start for a in self.assignments if a.task_id == task_id]
        return min(starts) if starts else None

    def gap(self) -> float | None:
        """makespan / lower bound - 1 (None without a bound)."""
        if not self.lower_bound_s:
            return None
        return self.makespan_s / self.lower_bound_s - 1.0

    # -- Ray -----------------------------------------------------------------------------------
    def to_placement_bundles(self, cpus_per_gpu: int = 1, use_gpu: bool = True,
                             include_running: bool = False) -> list[GroupBundles]:
        """One placement-group request per group: {"GPU": 1, "CPU": k} per GPU, STRICT_PACK.

        STRICT_PACK keeps a multi-GPU group on one node (the plan assumed NVLink peers) and is
        the only strategy Ray's soft node target honours, so single-GPU groups use it too.
        On a CPU-only cluster (`use_gpu=False`) each planned GPU becomes a {"CPU": k} bundle.
        """
        out = []
        for a in sorted(self.assignments, key=lambda a: (a.start, a.task_id, a.group_index)):
            if a.running and not include_running:
                continue
            bundle = {"GPU": 1.0, "CPU": float(cpus_per_gpu)} if use_gpu else {"CPU": float(cpus_per_gpu)}
            out.append(GroupBundles(a.task_id, a.group_index, a.node, [dict(bundle) for _ in a.gpu_ids],
                                    "STRICT_PACK", self.node_ids.get(a.node)))
        return out

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, nodes: Sequence[NodeSpec], tasks: Iterable[TaskSpec] | None = None) -> None:
        """Raise PlanError unless every GPU runs at most one group at any time (and, given
        `tasks`, every group has the task's GPU count and memory fits)."""
        by_name = {n.name: n for n in nodes}
        specs = {t.name: t for t in tasks} if tasks is not None else {}
        seen: set[tuple[str, int]] = set()
        per_gpu: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
        for a in self.assignments:
            node = by_name.get(a.node)
            if node is None:
                raise PlanError(f"{a.task_id}#{a.group_index}: unknown node {a.node!r}")
            if (a.task_id, a.group_index) in seen:
                raise PlanError(f"{a.task_id}#{a.group_index} assigned twice")
            seen.add((a.task_id, a.group_index))
            if not a.gpu_ids or len(set(a.gpu_ids)) != len(a.gpu_ids):
                raise PlanError(f"{a.task_id}#{a.group_index}: bad GPU ids {a.gpu_ids}")
            if any(g < 0 or g >= node.num_gpus for g in a.gpu_ids):
                raise PlanError(f"{a.task_id}#{a.group_index}: GPU ids {a.gpu_ids} outside {a.node} "
                                f"({node.num_gpus} GPUs)")
            if not (a.end > a.start >= 0 or (a.running and a.end >= a.start >= 0)):
                raise PlanError(f"{a.task_id}#{a.group_index}: bad interval [{a.start}, {a.end})")
            spec = specs.get(a.task_id)
            if spec is not None:
                if len(a.gpu_ids) != spec.gpus_per_group:
                    raise PlanError(f"{a.task_id}#{a.group_index}: {len(a.gpu_ids)} GPUs, task wants "
                                    f"{spec.gpus_per_group} per group")
                if spec.per_gpu_bytes() > node.gpu_memory_bytes:
                    raise PlanError(f"{a.task_id}#{a.group_index}: needs {spec.per_gpu_bytes() / GIB:.1f} GiB "
                                    f"per GPU, {a.node} has {node.gpu_memory_bytes / GIB:.1f}")
            for g in a.gpu_ids:
                per_gpu.setdefault((a.node, g), []).append((a.start, a.end, f"{a.task_id}#{a.group_index}"))
        eps = 1e-9
        for (node_name, gpu), spans in per_gpu.items():
            spans.sort()
            for (s0, e0, who0), (s1, _e1, who1) in zip(spans, spans[1:]):
                if s1 < e0 - eps:
                    raise PlanError(f"GPU {gpu} of {node_name} double-booked: {who0} [{s0:.3f}, {e0:.3f}) "
                                    f"overlaps {who1} from {s1:.3f}")

    # -- text ------------------------------------------------------------------------------------
    def describe(self, max_rows: int = 60) -> str:
        """Readable summary: quality numbers, then one line per task."""
        lines = [f"Plan [{self.solver}, {self.status}{': ' + self.detail if self.detail else ''}] "
                 f"objective={self.objective} "
                 f"makespan={_fmt_s(self.makespan_s)} tasks={len(self.groups())} "
                 f"groups={len(self.assignments)} solve={self.solve_seconds:.2f}s wall={self.wall_seconds:.2f}s"]
        if self.lower_bound_s:
            lines.append(f"  lower bound {_fmt_s(self.lower_bound_s)} ({self.bound_source}); "
                         f"gap {100 * (self.gap() or 0.0):.1f}%  [cp-sat {_fmt_s(self.cp_sat_bound_s)}, "
                         f"analytic {_fmt_s(self.analytic_bound_s)}]")
        if self.migrated:
            lines.append(f"  migrated: {', '.join(self.migrated)}")
        if self.potential_nodes:
            used = {a.node for a in self.assignments}
            lines.append(f"  potential nodes (the autoscaler starts one for a group planned there; planned "
                         f"{_fmt_s(self.start_delay_s)} late): " + ", ".join(
                             n + (" [in plan]" if n in used else "") for n in self.potential_nodes))
        by_task: dict[str, list[Assignment]] = {}
        for a in self.assignments:
            by_task.setdefault(a.task_id, []).append(a)
        order = sorted(by_task, key=lambda t: (min(a.start for a in by_task[t]), t))
        for i, task in enumerate(order):
            if i >= max_rows:
                lines.append(f"  ... {len(order) - max_rows} more tasks")
                break
            groups = sorted(by_task[task], key=lambda a: a.group_index)
            where = " ".join(f"{a.node}:{','.join(map(str, a.gpu_ids))}" for a in groups)
            tag = " (running)" if any(a.running for a in groups) else ""
            lines.append(f"  {task:<24} {len(groups)}x{len(groups[0].gpu_ids)}GPU "
                         f"[{_fmt_s(min(a.start for a in groups))} -> {_fmt_s(max(a.end for a in groups))}]"
                         f"{tag}  {where}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 3600:
        return f"{x / 3600:.2f}h"
    if x >= 60:
        return f"{x / 60:.1f}m"
    return f"{x:.1f}s"
