"""List schedulers on the integer problem: the LPT greedy (fallback and CP-SAT hint) and the
first-come-first-served baseline the benchmark compares against.

Both keep one free-at time per GPU and start a task when enough GPUs (whole groups on one
node) are free at once; no backfilling into earlier holes (`Problem.left_shift` does that).
"""

from __future__ import annotations

import bisect
from typing import Callable

from alto_ray.cluster.allocator_problem import Placed, Problem, PTask


def _free_times(prob: Problem, keep_running: bool = True) -> list[list[int]]:
    free = [[0] * n.num_gpus for n in prob.nodes]
    pinned = list(prob.background)
    if keep_running:
        pinned += [x for p in prob.tasks for x in p.pinned]
    for n, r, e in pinned:
        for g in r.gpu_ids:
            free[n][g] = max(free[n][g], e)
    return free


def _earliest(free: list[list[int]], p: PTask, g: int, not_before: int) -> tuple[int, list[tuple[int, list[int]]]]:
    """Earliest time >= not_before at which g groups of p fit, and which GPUs they take."""
    sorted_free = {n: sorted(free[n]) for n in p.slots}
    cands = sorted({not_before} | {t for n in p.slots for t in free[n] if t > not_before})
    for t in cands:
        avail = sum(bisect.bisect_right(sorted_free[n], t) // p.gpg for n in p.slots)
        if avail >= g:
            return t, _choose(free, p, g, t)
    raise RuntimeError(f"{p.name}: {g} groups never fit")  # cannot happen: menu <= total slots


def _choose(free: list[list[int]], p: PTask, g: int, t: int) -> list[tuple[int, list[int]]]:
    """Pick g groups free at t, preferring GPUs freed latest (least idle time left behind)."""
    options: list[tuple[int, int, list[int]]] = []
    for n in p.slots:
        ready = sorted((gpu for gpu, f in enumerate(free[n]) if f <= t), key=lambda gpu: -free[n][gpu])
        for k in range(len(ready) // p.gpg):
            gpus = ready[k * p.gpg:(k + 1) * p.gpg]
            options.append((sum(free[n][x] for x in gpus), n, gpus))
    options.sort(key=lambda o: (-o[0], o[1]))
    return [(n, gpus) for _score, n, gpus in options[:g]]


def list_schedule(prob: Problem, order: list[int], pick_g: Callable[[PTask], int] | None,
                  fifo: bool = False) -> dict[int, Placed]:
    """Place tasks in `order`. pick_g(task) fixes the group count; None tries the whole menu
    and keeps the earliest end (fewest groups on ties). `fifo` forbids a task to start before
    the one placed before it (FCFS head-of-line blocking)."""
    free = _free_times(prob)
    sched: dict[int, Placed] = {i: prob.kept(i) for i, p in enumerate(prob.tasks) if p.running}
    last_start = 0
    for i in order:
        p = prob.tasks[i]
        if p.running:
            continue
        not_before = last_start if fifo else 0
        if pick_g is None:
            tries = {g: _earliest(free, p, g, not_before) for g in p.menu}
            g = min(p.menu, key=lambda g: (tries[g][0] + p.dur[g], g))
            t, chosen = tries[g]
        else:
            g = pick_g(p)
            t, chosen = _earliest(free, p, g, not_before)
        for n, gpus in chosen:
            for x in gpus:
                free[n][x] = t + p.dur[g]
        sched[i] = Placed(t, p.dur[g], [n for n, _gpus in chosen])
        last_start = t
    return sched


def greedy(prob: Problem, objective: str = "makespan") -> dict[int, Placed]:
    """Best of a few LPT list schedules (different group-count rules), left-shifted."""
    free_tasks = [i for i, p in enumerate(prob.tasks) if not p.running]
    if objective == "weighted_completion":
        # WSPT: high weight per GPU-second first.
        order = sorted(free_tasks, key=lambda i: -prob.tasks[i].spec.weight /
                       (prob.tasks[i].gpg * prob.tasks[i].dur[prob.tasks[i].menu[0]]))
        cands = [list_schedule(prob, order, None)]
        score = prob.weighted_completion
    else:
        lb = prob.analytic_makespan_bound()
        cands = [list_schedule(prob, _lpt(prob, free_tasks, lambda p: p.menu[0]), None)]
        for frac in (0.25, 0.5, 1.0):
            target = max(int(lb * frac), 1)
            rule = _target_rule(target)
            order = _lpt(prob, free_tasks, rule)
            cands.append(list_schedule(prob, order, rule))
        score = prob.makespan
    cands = [prob.left_shift(s) for s in cands]
    return min(cands, key=score)


def _target_rule(target: int) -> Callable[[PTask], int]:
    """Fewest groups that bring the task's duration under `target` (else the most it can use)."""
    def rule(p: PTask) -> int:
        for g in p.menu:
            if p.dur[g] <= target:
                return g
        return p.menu[-1]
    return rule


def _lpt(prob: Problem, idx: list[int], g_of: Callable[[PTask], int]) -> list[int]:
    """Longest processing time first (duration at the chosen group count, then GPU-time)."""
    def key(i: int) -> tuple[int, int]:
        p = prob.tasks[i]
        g = g_of(p)
        return (-p.dur[g], -p.gpg * g * p.dur[g])
    return sorted(idx, key=key)


def fcfs(prob: Problem) -> dict[int, Placed]:
    """Arrival order; each task takes the groups it asks for (requested_groups, else max_groups;
    rounded down to the menu) as GPUs free up, never starting before an earlier arrival."""
    order = sorted((i for i, p in enumerate(prob.tasks) if not p.running),
                   key=lambda i: (prob.tasks[i].spec.arrival, i))
    def asked(p: PTask) -> int:
        want = p.spec.requested_groups or p.menu[-1]
        return max([g for g in p.menu if g <= want] or [p.menu[0]])
    return list_schedule(prob, order, asked, fifo=True)
