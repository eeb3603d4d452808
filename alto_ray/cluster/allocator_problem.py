"""The allocator's integer problem, shared by CP-SAT, the greedy and FCFS.

Times are integers in `unit` seconds (a power of ten chosen so the serial upper bound is
about 1e5 units), so all three planners see identical durations and a greedy schedule is a
valid CP-SAT hint.  Groups are placed on *nodes*; GPU ids are picked afterwards by a sweep
over start times (`to_plan`), which always succeeds when the per-node cumulative holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from alto_ray.cluster.plan import (GIB, Assignment, InfeasibleTaskError, NodeSpec, Plan, PlanError,
                                   RunningGroup, TaskSpec)

_MENU = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class PTask:
    """A task in integer form."""

    spec: TaskSpec
    gpg: int
    menu: list[int]
    dur: dict[int, int]
    slots: dict[int, int]                     # node index -> most groups that fit there at once
    pinned: list[tuple[int, RunningGroup, int]] = field(default_factory=list)  # (node, group, end)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return bool(self.pinned)

    @property
    def pinned_end(self) -> int:
        return max((e for _n, _g, e in self.pinned), default=0)


@dataclass
class Placed:
    """A task's place in a schedule: all its groups start together."""

    start: int
    dur: int
    nodes: list[int]                          # node index of each group
    kept: bool = False                        # running groups left where they are


class Problem:
    """Nodes, tasks, pinned groups, in integer time units."""

    def __init__(self, nodes: Sequence[NodeSpec], tasks: Sequence[TaskSpec],
                 running: Sequence[RunningGroup] = (), time_unit_s: float | None = None) -> None:
        if not nodes:
            raise ValueError("no nodes to plan on")
        self.nodes = list(nodes)
        node_idx = {n.name: i for i, n in enumerate(self.nodes)}
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names: {sorted({n for n in names if names.count(n) > 1})}")
        for t in tasks:
            check_task_fits(t, self.nodes)
        ub_s = sum(t.duration_s(1) for t in tasks) + max((r.remaining_s for r in running), default=0.0)
        self.unit = time_unit_s or _auto_unit(ub_s)
        self.tasks: list[PTask] = [self._ptask(t) for t in tasks]
        by_name = {p.name: p for p in self.tasks}
        self.background: list[tuple[int, RunningGroup, int]] = []
        for r in running:
            if r.node not in node_idx:
                raise ValueError(f"running group {r.task_id}#{r.group_index} on unknown node {r.node!r}")
            item = (node_idx[r.node], r, max(self.to_units(r.remaining_s), 0))
            (by_name[r.task_id].pinned if r.task_id in by_name else self.background).append(item)
        self.total_gpus = sum(n.num_gpus for n in self.nodes)
        serial = sum(p.dur[p.menu[0]] for p in self.tasks)
        self.horizon = serial + max([e for p in self.tasks for *_x, e in p.pinned] +
                                    [e for *_x, e in self.background] + [0]) + 1

    def to_units(self, seconds: float) -> int:
        return int(math.ceil(seconds / self.unit - 1e-9))

    def _ptask(self, t: TaskSpec) -> PTask:
        gpg = t.gpus_per_group
        slots = {i: n.num_gpus // gpg for i, n in enumerate(self.nodes)
                 if n.num_gpus >= gpg and t.per_gpu_bytes() <= n.gpu_memory_bytes}
        gmax = min(t.group_cap(), sum(slots.values()))
        dur: dict[int, int] = {}
        menu: list[int] = []
        for g in sorted({g for g in _MENU if g <= gmax} | {gmax}):
            d = max(self.to_units(t.duration_s(g)), 1)
            if menu and d >= dur[menu[-1]]:
                continue                      # more groups, no faster: never worth it
            menu.append(g)
            dur[g] = d
        return PTask(t, gpg, menu, dur, slots)

    # -- bounds ----------------------------------------------------------------------------------
    def analytic_makespan_bound(self, migration: bool = False) -> int:
        """max(total GPU-time / total GPUs, longest task at its best parallelism, pinned ends)."""
        gpu_time = 0
        longest = 0
        for p in self.tasks:
            free_time = min(p.gpg * g * p.dur[g] for g in p.menu)
            free_len = min(p.dur.values())
            if p.running:
                kept_time = sum(len(r.gpu_ids) * e for _n, r, e in p.pinned)
                gpu_time += min(kept_time, free_time) if migration else kept_time
                longest = max(longest, min(p.pinned_end, free_len) if migration else p.pinned_end)
            else:
                gpu_time += free_time
                longest = max(longest, free_len)
        gpu_time += sum(len(r.gpu_ids) * e for _n, r, e in self.background)
        longest = max([longest] + [e for *_x, e in self.background])
        return max(math.ceil(gpu_time / max(self.total_gpus, 1)), longest)

    # -- evaluation --------------------------------------------------------------------------------
    def makespan(self, sched: dict[int, Placed]) -> int:
        ends = [pl.start + pl.dur for pl in sched.values()] + [e for *_x, e in self.background]
        return max(ends + [0])

    def weighted_completion(self, sched: dict[int, Placed]) -> float:
        return sum(self.tasks[i].spec.weight * (pl.start + pl.dur) for i, pl in sched.items())

    def kept(self, i: int) -> Placed:
        p = self.tasks[i]
        return Placed(0, p.pinned_end, [n for n, _r, _e in p.pinned], kept=True)

    # -- compaction --------------------------------------------------------------------------------
    def left_shift(self, sched: dict[int, Placed]) -> dict[int, Placed]:
        """Serial schedule generation in the given start order with nodes fixed: each task moves
        to its earliest feasible start, which is never later than before (so never worse)."""
        usage: list[list[tuple[int, int, int]]] = [[] for _ in self.nodes]   # (start, end, gpus)
        for n, r, e in self.background:
            usage[n].append((0, e, len(r.gpu_ids)))
        out: dict[int, Placed] = {}
        for i, pl in sched.items():
            if pl.kept:
                out[i] = pl
                for n, r, e in self.tasks[i].pinned:
                    usage[n].append((0, e, len(r.gpu_ids)))
        for i in sorted((i for i, pl in sched.items() if not pl.kept), key=lambda i: (sched[i].start, i)):
            pl = sched[i]
            need: dict[int, int] = {}
            for n in pl.nodes:
                need[n] = need.get(n, 0) + self.tasks[i].gpg
            cands = sorted({0} | {e for n in need for _s, e, _d in usage[n] if e <= pl.start})
            start = pl.start
            for c in cands:
                if all(_fits(usage[n], c, c + pl.dur, d, self.nodes[n].num_gpus) for n, d in need.items()):
                    start = c
                    break
            out[i] = Placed(start, pl.dur, list(pl.nodes))
            for n, d in need.items():
                usage[n].append((start, start + pl.dur, d))
        return out

    # -- output ----------------------------------------------------------------------------------------
    def to_plan(self, sched: dict[int, Placed], **info) -> Plan:
        """Map node-level placements to GPU ids (sweep in start order) and convert to seconds."""
        busy = [[0] * n.num_gpus for n in self.nodes]          # busy-until per GPU
        assignments: list[Assignment] = []
        for n, r, e in self.background:
            for g in r.gpu_ids:
                busy[n][g] = max(busy[n][g], e)
        for i, pl in sched.items():
            if pl.kept:
                for n, r, e in self.tasks[i].pinned:
                    for g in r.gpu_ids:
                        busy[n][g] = max(busy[n][g], e)
                    assignments.append(Assignment(r.task_id, r.group_index, r.node, tuple(r.gpu_ids), 0.0,
                                                  e * self.unit, running=True))
        for i in sorted((i for i, pl in sched.items() if not pl.kept), key=lambda i: (sched[i].start, i)):
            pl, p = sched[i], self.tasks[i]
            for gi, n in enumerate(sorted(pl.nodes)):
                ids = _pick_gpus(busy[n], pl.start, p.gpg)
                if ids is None:
                    raise PlanError(f"no free GPUs on {self.nodes[n].name} for {p.name}#{gi} at "
                                    f"{pl.start * self.unit:.1f}s (cumulative violated)")
                for g in ids:
                    busy[n][g] = pl.start + pl.dur
                assignments.append(Assignment(p.name, gi, self.nodes[n].name, ids, pl.start * self.unit,
                                              (pl.start + pl.dur) * self.unit))
        return Plan(assignments=assignments, makespan_s=self.makespan(sched) * self.unit, time_unit_s=self.unit,
                    node_gpus={n.name: n.num_gpus for n in self.nodes},
                    node_ids={n.name: n.ray_node_id for n in self.nodes if n.ray_node_id},
                    migrated=[self.tasks[i].name for i, pl in sched.items()
                              if self.tasks[i].running and not pl.kept], **info)


def check_task_fits(t: TaskSpec, nodes: Sequence[NodeSpec]) -> None:
    """Raise InfeasibleTaskError naming the task and sizes unless some node can host a group."""
    check_memory(t, nodes)
    if t.work_s is None or t.work_s < 0:
        raise ValueError(f"task {t.name!r} has no predicted work (work_s={t.work_s})")


def check_memory(t: TaskSpec, nodes: Sequence[NodeSpec]) -> None:
    """The memory/GPU-count half of check_task_fits (no duration needed)."""
    if t.num_adapters < 1 or t.gpus_per_group < 1:
        raise InfeasibleTaskError(f"task {t.name!r}: needs num_adapters >= 1 and gpus_per_group >= 1 "
                                  f"(got {t.num_adapters}, {t.gpus_per_group})")
    big = [n for n in nodes if n.num_gpus >= t.gpus_per_group]
    if not big:
        raise InfeasibleTaskError(f"task {t.name!r} wants {t.gpus_per_group} GPUs per group on one node; the "
                                  f"largest node has {max(n.num_gpus for n in nodes)}")
    need = t.per_gpu_bytes()
    if not any(need <= n.gpu_memory_bytes for n in big):
        best = max(n.gpu_memory_bytes for n in big)
        raise InfeasibleTaskError(
            f"task {t.name!r} does not fit any GPU: backbone {t.backbone_bytes / GIB:.1f} GiB over "
            f"{t.gpus_per_group} GPU(s) + one adapter {t.adapter_bytes / GIB:.2f} GiB = {need / GIB:.1f} GiB "
            f"per GPU > {best / GIB:.1f} GiB (largest GPU on a node with {t.gpus_per_group}+ GPUs)")


def _auto_unit(ub_s: float) -> float:
    """Power of ten putting the serial upper bound near 1e5 units (never finer than 1 ms)."""
    if ub_s <= 0:
        return 1.0
    return max(10.0 ** math.floor(math.log10(ub_s / 1e5)), 1e-3)


def _fits(usage: list[tuple[int, int, int]], s: int, e: int, demand: int, cap: int) -> bool:
    """Whether `demand` more GPUs fit over [s, e) given the intervals in `usage`."""
    live = [(a, b, d) for a, b, d in usage if a < e and b > s]
    points = {s} | {a for a, _b, _d in live if a > s}
    return all(sum(d for a, b, d in live if a <= t < b) + demand <= cap for t in points)


def _pick_gpus(busy: list[int], start: int, k: int) -> tuple[int, ...] | None:
    """k GPUs free at `start`: an aligned contiguous block when possible (NVLink peers)."""
    free = [g for g, b in enumerate(busy) if b <= start]
    if len(free) < k:
        return None
    fs = set(free)
    for base in range(0, len(busy) - k + 1, k):
        if all(g in fs for g in range(base, base + k)):
            return tuple(range(base, base + k))
    # best fit: GPUs that became free last waste the least idle time
    return tuple(sorted(sorted(free, key=lambda g: -busy[g])[:k]))
