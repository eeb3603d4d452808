"""CP-SAT allocator: how many groups each task gets, on which nodes, and when.

Model (kept small enough for 100 tasks x 64 GPUs in a few seconds):
  * per task a one-hot choice over a small menu of group counts (1, 2, 3, 4, 6, 8, ...), each
    with its predicted duration; all groups of a task start together;
  * per (task, eligible node) an optional interval sharing the task's start/duration, with an
    integer `k` = groups placed there; per node a cumulative over GPUs (demand gpus_per_group*k);
  * a redundant cluster-wide cumulative over the task intervals (better propagation);
  * running groups are fixed intervals on their node; with `migration_cost` a running task may
    instead be re-placed from scratch at that penalty (seconds added to the objective).
GPU ids are assigned after solving (`Problem.to_plan`).  The LPT greedy schedule is the hint
and an upper bound; it is also the answer when CP-SAT has no solution within the time limit.
"""

from __future__ import annotations

import time
from typing import Sequence

from ortools.sat.python import cp_model

from alto_ray.cluster.allocator_greedy import fcfs, greedy
from alto_ray.cluster.allocator_problem import Placed, Problem
from alto_ray.cluster.plan import NodeSpec, Plan, RunningGroup, TaskSpec

OBJECTIVES = ("makespan", "weighted_completion")
_POST_RESERVE_S = 0.2


class Allocator:
    """Plans tasks onto `nodes`; call `plan()` again whenever the picture changes."""

    def __init__(self, nodes: Sequence[NodeSpec], time_limit_s: float = 3.0, num_workers: int = 0,
                 objective: str = "makespan", migration_cost: float | None = None, seed: int = 0) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.nodes = list(nodes)
        self.time_limit_s = time_limit_s
        self.num_workers = num_workers
        self.objective = objective
        self.migration_cost = migration_cost
        self.seed = seed

    # -- baselines ----------------------------------------------------------------------------------
    def fcfs(self, tasks: Sequence[TaskSpec], running: Sequence[RunningGroup] = ()) -> Plan:
        """First-come-first-served baseline (benchmark reference)."""
        t0 = time.perf_counter()
        prob = Problem(self.nodes, tasks, running)
        sched = fcfs(prob)
        return self._finish(prob, sched, t0, status="FCFS", solver="fcfs", objective=self.objective)

    def greedy(self, tasks: Sequence[TaskSpec], running: Sequence[RunningGroup] = ()) -> Plan:
        """LPT list scheduling alone."""
        t0 = time.perf_counter()
        prob = Problem(self.nodes, tasks, running)
        sched = greedy(prob, self.objective)
        return self._finish(prob, sched, t0, status="GREEDY", solver="greedy", objective=self.objective)

    # -- CP-SAT ------------------------------------------------------------------------------------
    def plan(self, tasks: Sequence[TaskSpec], running: Sequence[RunningGroup] = (), *,
             time_limit_s: float | None = None, objective: str | None = None,
             migration_cost: float | None | str = "default") -> Plan:
        """Best plan found within `time_limit_s` (model build included).

        Raises InfeasibleTaskError (a ValueError) naming any task that fits no node.
        """
        t0 = time.perf_counter()
        limit = self.time_limit_s if time_limit_s is None else time_limit_s
        objective = objective or self.objective
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        mig = self.migration_cost if migration_cost == "default" else migration_cost
        prob = Problem(self.nodes, tasks, running)
        hint = greedy(prob, objective)
        if not any(not p.running or mig is not None for p in prob.tasks):
            return self._finish(prob, hint, t0, status="OPTIMAL", solver="fixed", objective=objective)
        left = limit - (time.perf_counter() - t0)
        if left <= 0.01:
            return self._finish(prob, hint, t0, status="GREEDY_FALLBACK", solver="greedy",
                                objective=objective, detail="no time left for CP-SAT")
        model = _Model(prob, objective, None if mig is None else prob.to_units(mig))
        model.add_hint(hint)
        model.add_upper_bound(hint)
        # Keep a little of the budget for reading, left-shifting and GPU-id mapping.
        left = limit - (time.perf_counter() - t0) - min(_POST_RESERVE_S, 0.05 * limit)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(left, 0.001)
        solver.parameters.random_seed = self.seed
        # Without this, presolve's dual reductions can cut off the greedy hint (seen on 9.15:
        # "hint is complete, but it is infeasible") and the search may find nothing in time.
        solver.parameters.keep_all_feasible_solutions_in_presolve = True
        if self.num_workers:
            solver.parameters.num_workers = self.num_workers
        status = solver.solve(model.m)
        name = solver.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return self._finish(prob, hint, t0, status="GREEDY_FALLBACK", solver="greedy", objective=objective,
                                detail=f"CP-SAT {name}", solve_seconds=solver.wall_time)
        sched = prob.left_shift(model.read(solver))
        score = prob.makespan if objective == "makespan" else prob.weighted_completion
        if mig is None and score(hint) < score(sched):    # cannot happen with the bound; be safe
            sched = hint
        bound = solver.best_objective_bound
        pure_makespan = objective == "makespan" and mig is None
        return self._finish(prob, sched, t0, status=name, solver="cp-sat", objective=objective,
                            solve_seconds=solver.wall_time,
                            cp_sat_bound_s=bound * prob.unit if pure_makespan else None,
                            objective_bound=bound * (prob.unit if objective == "makespan" else 1.0),
                            migration=mig is not None)

    def _finish(self, prob: Problem, sched: dict[int, Placed], t0: float, *, status: str, solver: str,
                objective: str, detail: str = "", solve_seconds: float = 0.0,
                cp_sat_bound_s: float | None = None, objective_bound: float | None = None,
                migration: bool = False) -> Plan:
        analytic = prob.analytic_makespan_bound(migration) * prob.unit
        if cp_sat_bound_s is not None and cp_sat_bound_s > analytic:
            lb, src = cp_sat_bound_s, "cp-sat"
        elif cp_sat_bound_s is not None and cp_sat_bound_s == analytic:
            lb, src = analytic, "cp-sat = analytic"
        else:
            lb, src = analytic, "analytic"
        value = prob.makespan(sched) * prob.unit if objective == "makespan" else prob.weighted_completion(sched) * prob.unit
        plan = prob.to_plan(sched, objective=objective, objective_value=value, status=status, solver=solver,
                            lower_bound_s=lb, cp_sat_bound_s=cp_sat_bound_s, analytic_bound_s=analytic,
                            bound_source=src, solve_seconds=solve_seconds, detail=detail,
                            objective_bound=objective_bound)
        plan.wall_seconds = time.perf_counter() - t0
        return plan


class _Model:
    """The CP-SAT model of a Problem (see module docstring)."""

    def __init__(self, prob: Problem, objective: str, migration_units: int | None) -> None:
        self.prob = prob
        m = self.m = cp_model.CpModel()
        horizon = prob.horizon
        node_iv: list[list] = [[] for _ in prob.nodes]
        node_dem: list[list] = [[] for _ in prob.nodes]
        glob_iv: list = []
        glob_dem: list = []
        ends: list = []
        penalty: list = []
        self.vars: dict[int, dict] = {}
        for n, r, e in prob.background:
            if e > 0:
                iv = m.new_fixed_size_interval_var(0, e, f"bg_{r.task_id}_{r.group_index}")
                node_iv[n].append(iv)
                node_dem[n].append(len(r.gpu_ids))
            ends.append(e)
        for i, p in enumerate(prob.tasks):
            v: dict = {}
            keep = None
            if p.running:
                if migration_units is None:
                    for n, r, e in p.pinned:
                        if e > 0:
                            node_iv[n].append(m.new_fixed_size_interval_var(0, e, f"pin_{i}_{r.group_index}"))
                            node_dem[n].append(len(r.gpu_ids))
                    ends.append((p.pinned_end, 1, p.spec.weight))
                    continue
                keep = v["keep"] = m.new_bool_var(f"keep_{i}")
                for n, r, e in p.pinned:
                    if e > 0:
                        node_iv[n].append(m.new_optional_fixed_size_interval_var(0, e, keep, f"pin_{i}_{r.group_index}"))
                        node_dem[n].append(len(r.gpu_ids))
                penalty.append(migration_units * (1 - keep))
            c = v["c"] = {g: m.new_bool_var(f"c_{i}_{g}") for g in p.menu}
            if keep is None:
                m.add_exactly_one(c.values())
            else:
                m.add_exactly_one(list(c.values()) + [keep])
            durs = sorted(set(p.dur.values()) | ({0} if keep is not None else set()))
            dur = v["dur"] = m.new_int_var_from_domain(cp_model.Domain.from_values(durs), f"dur_{i}")
            m.add(dur == sum(c[g] * p.dur[g] for g in p.menu))
            s = v["s"] = m.new_int_var(0, horizon, f"s_{i}")
            e = v["e"] = m.new_int_var(0, horizon, f"e_{i}")
            gcount = v["G"] = m.new_int_var(0, p.menu[-1], f"G_{i}")
            m.add(gcount == sum(c[g] * g for g in p.menu))
            ks = v["k"] = {}
            pres = v["p"] = {}
            for n, cap in p.slots.items():
                k = ks[n] = m.new_int_var(0, min(cap, p.menu[-1]), f"k_{i}_{n}")
                pn = pres[n] = m.new_bool_var(f"p_{i}_{n}")
                m.add(k >= 1).only_enforce_if(pn)
                m.add(k == 0).only_enforce_if(~pn)
                node_iv[n].append(m.new_optional_interval_var(s, dur, e, pn, f"iv_{i}_{n}"))
                node_dem[n].append(p.gpg * k)
            m.add(sum(ks.values()) == gcount)
            if keep is None:
                glob_iv.append(m.new_interval_var(s, dur, e, f"task_{i}"))
            else:
                glob_iv.append(m.new_optional_interval_var(s, dur, e, ~keep, f"task_{i}"))
                eff = m.new_int_var(0, horizon, f"eff_{i}")
                m.add(eff >= e).only_enforce_if(~keep)
                m.add(eff >= p.pinned_end).only_enforce_if(keep)
                e = eff
            glob_dem.append(p.gpg * gcount)
            ends.append((e, 0, p.spec.weight))
            self.vars[i] = v
        for n, node in enumerate(prob.nodes):
            if node_iv[n]:
                m.add_cumulative(node_iv[n], node_dem[n], node.num_gpus)
        if glob_iv:
            m.add_cumulative(glob_iv, glob_dem, sum(n.num_gpus for n in prob.nodes))
        self.makespan = m.new_int_var(0, horizon, "makespan")
        # Redundant energy cut, linear thanks to the one-hot menu: all GPU-seconds fit under
        # makespan x GPUs.  Gives the LP relaxation the GPU-time bound the cumulatives miss.
        energy = [p.gpg * g * p.dur[g] * v["c"][g] for i, v in self.vars.items()
                  for p in [prob.tasks[i]] for g in p.menu]
        fixed = [len(r.gpu_ids) * e for n, r, e in prob.background]
        for i, p in enumerate(prob.tasks):
            if p.running:
                kept = sum(len(r.gpu_ids) * e for _n, r, e in p.pinned)
                fixed.append(kept * self.vars[i]["keep"] if i in self.vars else kept)
        m.add(sum(energy) + sum(fixed) <= sum(n.num_gpus for n in prob.nodes) * self.makespan)
        for x in ends:
            m.add(self.makespan >= (x[0] if isinstance(x, tuple) else x))
        if objective == "makespan":
            self.obj = self.makespan + sum(penalty)
        else:
            self.obj = sum(max(1, round(w * 100)) * x for x, _fixed, w in
                           (x for x in ends if isinstance(x, tuple))) + sum(penalty)
        self.objective = objective
        self.weight_scale = 100
        m.minimize(self.obj)

    def add_hint(self, sched: dict[int, Placed]) -> None:
        """Hint the solver with a complete feasible schedule (running tasks kept)."""
        for i, v in self.vars.items():
            pl = sched[i]
            if "keep" in v:
                self.m.add_hint(v["keep"], pl.kept)
            g = 0 if pl.kept else len(pl.nodes)
            for gg, var in v["c"].items():
                self.m.add_hint(var, gg == g)
            self.m.add_hint(v["G"], g)
            self.m.add_hint(v["dur"], 0 if pl.kept else pl.dur)
            self.m.add_hint(v["s"], pl.start)
            self.m.add_hint(v["e"], pl.start + (0 if pl.kept else pl.dur))
            for n, k in v["k"].items():
                cnt = 0 if pl.kept else pl.nodes.count(n)
                self.m.add_hint(k, cnt)
                self.m.add_hint(v["p"][n], cnt > 0)
        self.m.add_hint(self.makespan, self.prob.makespan(sched))

    def add_upper_bound(self, sched: dict[int, Placed]) -> None:
        """The greedy's objective is an upper bound (the greedy keeps running tasks in place)."""
        if self.objective == "makespan":
            self.m.add(self.obj <= self.prob.makespan(sched))
        else:
            self.m.add(self.obj <= sum(max(1, round(self.prob.tasks[i].spec.weight * 100)) * (pl.start + pl.dur)
                                       for i, pl in sched.items()))

    def read(self, solver: cp_model.CpSolver) -> dict[int, Placed]:
        """The solved schedule (running tasks not in `vars` stay kept)."""
        out: dict[int, Placed] = {}
        for i, p in enumerate(self.prob.tasks):
            v = self.vars.get(i)
            if v is None or ("keep" in v and solver.boolean_value(v["keep"])):
                out[i] = self.prob.kept(i)
                continue
            nodes = [n for n, k in v["k"].items() for _ in range(solver.value(k))]
            out[i] = Placed(solver.value(v["s"]), solver.value(v["dur"]), nodes)
        return out


def plan(nodes: Sequence[NodeSpec], tasks: Sequence[TaskSpec], running: Sequence[RunningGroup] = (),
         **kwargs) -> Plan:
    """One-shot CP-SAT plan (kwargs go to Allocator)."""
    return Allocator(nodes, **kwargs).plan(tasks, running)


def plan_fcfs(nodes: Sequence[NodeSpec], tasks: Sequence[TaskSpec], running: Sequence[RunningGroup] = ()) -> Plan:
    """First-come-first-served baseline plan."""
    return Allocator(nodes).fcfs(tasks, running)
