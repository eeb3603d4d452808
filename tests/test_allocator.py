"""Allocator, plan and predictor tests: small cases checkable by hand, no Ray."""

from __future__ import annotations

import random

import pytest

from alto_ray.cluster import (GIB, Allocator, Assignment, DurationPredictor, InfeasibleTaskError, NodeSpec, Plan,
                              PlanError, RunningGroup, TaskSpec)


def _task(name: str, work: float, max_groups: int = 1, gpg: int = 1, backbone_gb: float = 10, adapters: int = 8,
          **kw) -> TaskSpec:
    return TaskSpec(name, int(backbone_gb * GIB), GIB, adapters, gpus_per_group=gpg, max_groups=max_groups,
                    work_s=work, **kw)


def _running(plan: Plan, task: str, left: float) -> list[RunningGroup]:
    return [RunningGroup(a.task_id, a.group_index, a.node, a.gpu_ids, left) for a in plan.for_task(task)]


NODES_2 = [NodeSpec("n0", 2)]


def test_small_case_optimal_by_hand() -> None:
    # 2 GPUs; A (60 s of work, may split in 2), B 40 s, C 20 s. Total GPU-time 120 -> >= 60 s.
    # Optimum 60: A alone on one GPU, B then C on the other. Splitting A first gives 70.
    tasks = [_task("A", 60, max_groups=2, requested_groups=2), _task("B", 40), _task("C", 20)]
    alloc = Allocator(NODES_2, time_limit_s=5)
    plan = alloc.plan(tasks)
    plan.validate(NODES_2, tasks)
    assert plan.status == "OPTIMAL"
    assert plan.makespan_s == pytest.approx(60)
    assert plan.groups() == {"A": 1, "B": 1, "C": 1}
    assert plan.lower_bound_s == pytest.approx(60)
    fcfs = alloc.fcfs(tasks)               # A takes the 2 groups it asks for, then B || C
    fcfs.validate(NODES_2, tasks)
    assert fcfs.makespan_s == pytest.approx(70)
    assert "A" in plan.describe() and "OPTIMAL" in plan.describe()


def test_weighted_completion_puts_heavy_short_task_first() -> None:
    nodes = [NodeSpec("n0", 1)]
    tasks = [_task("long", 100, weight=1.0), _task("short", 10, weight=5.0)]
    plan = Allocator(nodes, time_limit_s=5, objective="weighted_completion").plan(tasks)
    plan.validate(nodes, tasks)
    assert plan.task_start("short") == 0 and plan.task_start("long") == pytest.approx(10)
    assert plan.objective_value == pytest.approx(5 * 10 + 110)


def test_memory_infeasible_task_rejected_with_name_and_sizes() -> None:
    nodes = [NodeSpec("n0", 8, 80 * GIB)]
    with pytest.raises(InfeasibleTaskError, match=r"huge-70b.*140\.0 GiB.*80\.0 GiB"):
        Allocator(nodes).plan([_task("ok", 10), _task("huge-70b", 10, backbone_gb=140)])
    with pytest.raises(ValueError, match="wants 16 GPUs per group"):
        Allocator(nodes).plan([_task("wide", 10, gpg=16, backbone_gb=140)])
    # sharded over 4 GPUs it fits: 35 GiB + 1 GiB per GPU
    plan = Allocator(nodes, time_limit_s=2).plan([_task("sharded", 10, gpg=4, backbone_gb=140)])
    plan.validate(nodes)


def test_multi_gpu_groups_stay_on_one_node_and_bundles() -> None:
    nodes = [NodeSpec("a", 4), NodeSpec("b", 4), NodeSpec("c", 2)]
    tasks = [_task("tp4", 80, max_groups=2, gpg=4, backbone_gb=140), _task("tp2", 60, max_groups=3, gpg=2),
             _task("s1", 30, max_groups=4), _task("s2", 20, max_groups=2)]
    plan = Allocator(nodes, time_limit_s=3).plan(tasks)
    plan.validate(nodes, tasks)
    for a in plan.for_task("tp4"):
        assert a.node in ("a", "b") and len(a.gpu_ids) == 4
    for a in plan.for_task("tp2"):
        assert len(a.gpu_ids) == 2
    bundles = plan.to_placement_bundles(cpus_per_gpu=2)
    assert len(bundles) == len(plan.assignments)
    tp4 = [b for b in bundles if b.task_id == "tp4"][0]
    assert tp4.strategy == "STRICT_PACK" and tp4.bundles == [{"GPU": 1.0, "CPU": 2.0}] * 4
    cpu = plan.to_placement_bundles(use_gpu=False)
    assert all(set(b) == {"CPU"} for g in cpu for b in g.bundles)


def test_replan_keeps_running_groups_in_place() -> None:
    nodes = [NodeSpec("n0", 2), NodeSpec("n1", 2)]
    tasks = [_task("A", 100, max_groups=2), _task("B", 50)]
    alloc = Allocator(nodes, time_limit_s=2)
    first = alloc.plan(tasks)
    first.validate(nodes, tasks)
    running = _running(first, "A", 30) + _running(first, "B", 10)
    tasks2 = tasks + [_task("C", 80, max_groups=4), _task("D", 20)]   # two arrivals
    second = alloc.plan(tasks2, running)
    second.validate(nodes, tasks2)
    for r in running:
        a = [x for x in second.for_task(r.task_id) if x.group_index == r.group_index][0]
        assert (a.node, a.gpu_ids, a.start, a.end, a.running) == (r.node, r.gpu_ids, 0, pytest.approx(r.remaining_s),
                                                                  True)
    assert not second.migrated
    assert second.to_placement_bundles() and all(b.task_id in ("C", "D") for b in second.to_placement_bundles())


def test_migration_cost_moves_running_group_only_when_it_pays() -> None:
    # A runs on n0 (2 GPUs) for 100 s more; B needs both GPUs of n0 (the only 2-GPU node).
    nodes = [NodeSpec("n0", 2), NodeSpec("n1", 1)]
    tasks = [_task("A", 100), _task("B", 100, gpg=2)]
    running = [RunningGroup("A", 0, "n0", (0,), 100.0)]
    alloc = Allocator(nodes, time_limit_s=3)
    kept = alloc.plan(tasks, running)
    kept.validate(nodes, tasks)
    assert kept.makespan_s == pytest.approx(200) and not kept.migrated
    moved = alloc.plan(tasks, running, migration_cost=10.0)
    moved.validate(nodes, tasks)
    assert moved.migrated == ["A"] and moved.makespan_s == pytest.approx(100)
    assert moved.for_task("A")[0].node == "n1"
    expensive = alloc.plan(tasks, running, migration_cost=500.0)
    assert not expensive.migrated and expensive.makespan_s == pytest.approx(200)


def _mix(n: int, seed: int) -> list[TaskSpec]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gpg = rng.choice((1, 1, 1, 2, 4))
        adapters = rng.randint(2, 16)
        out.append(_task(f"t{i}", rng.uniform(50, 400) * adapters / 4, max_groups=adapters, gpg=gpg,
                         backbone_gb=20 * gpg, adapters=adapters, requested_groups=rng.choice((1, 2, 4)),
                         min_duration_s=rng.uniform(10, 60)))
    return out


def test_cp_sat_beats_fcfs_on_heterogeneous_mix() -> None:
    nodes = [NodeSpec(f"n{i}", 4) for i in range(3)]
    tasks = _mix(14, seed=1)
    alloc = Allocator(nodes, time_limit_s=3, num_workers=2)
    plan, fcfs, greedy = alloc.plan(tasks), alloc.fcfs(tasks), alloc.greedy(tasks)
    for p in (plan, fcfs, greedy):
        p.validate(nodes, tasks)
    assert plan.solver == "cp-sat" and plan.status in ("OPTIMAL", "FEASIBLE")
    assert plan.makespan_s <= greedy.makespan_s
    assert plan.makespan_s < 0.9 * fcfs.makespan_s
    assert plan.lower_bound_s <= plan.makespan_s + 1e-6


def test_greedy_fallback_when_time_limit_is_zero() -> None:
    nodes = [NodeSpec(f"n{i}", 4) for i in range(2)]
    tasks = _mix(10, seed=2)
    plan = Allocator(nodes, time_limit_s=0.0).plan(tasks)
    plan.validate(nodes, tasks)
    assert plan.status == "GREEDY_FALLBACK" and plan.solver == "greedy"
    assert plan.makespan_s >= plan.lower_bound_s - 1e-6
    assert "GREEDY_FALLBACK" in plan.describe()


def test_validator_catches_double_booking_and_bad_groups() -> None:
    tasks = [_task("x", 10), _task("y", 10)]
    bad = Plan([Assignment("x", 0, "n0", (0,), 0, 10), Assignment("y", 0, "n0", (0,), 5, 15)], makespan_s=15)
    with pytest.raises(PlanError, match="double-booked"):
        bad.validate(NODES_2, tasks)
    with pytest.raises(PlanError, match="outside"):
        Plan([Assignment("x", 0, "n0", (2,), 0, 10)], makespan_s=10).validate(NODES_2)
    with pytest.raises(PlanError, match="per group"):
        Plan([Assignment("x", 0, "n0", (0, 1), 0, 10)], makespan_s=10).validate(NODES_2, tasks)
    Plan([Assignment("x", 0, "n0", (0,), 0, 10), Assignment("y", 0, "n0", (0,), 10, 15)],
         makespan_s=15).validate(NODES_2, tasks)


def test_predictor_prior_measurement_and_error_stats() -> None:
    pred = DurationPredictor(peak_flops=1e12, mfu=0.5)
    pred.register("t", params=1e9, tokens_per_adapter_step=1000, num_adapters=4, steps_per_adapter=100)
    assert pred.prior_step_s("t") == pytest.approx(4 * 1e9 * 1000 / 0.5e12)        # 8 s per adapter-step
    assert pred.work_s("t") == pytest.approx(400 * 8 + pred.startup_s)              # + the groups' start
    assert pred.duration_s("t", 4) == pytest.approx(800 + pred.startup_s)           # = critical path
    pred.observe_step("t", step_time_s=2.0, tokens_per_step=4000, adapters_in_group=4)  # 0.5 s per adapter-step
    assert pred.adapter_step_s("t") == pytest.approx(0.5)
    pred.trial_progress("t", "a", 50)
    pred.trial_progress("t", "b", 0)                                                # early exit
    assert pred.work_s("t") == pytest.approx(25) and pred.min_duration_s("t") == pytest.approx(25)
    spec = pred.apply(_task("t", None))
    assert spec.work_s == pytest.approx(25)
    pred.mark_started("t", groups=1, now=0.0)
    assert pred.mark_finished("t", now=20.0) == pytest.approx(0.25)
    stats = pred.error_stats()
    assert stats["count"] == 1 and stats["mean_abs_rel_error"] == pytest.approx(0.25)
    assert stats["per_task"]["t"] == {"predicted_s": 25.0, "actual_s": 20.0}


def test_step_clock_leaves_the_groups_start_out() -> None:
    """Load and compile before the first step are not a step time (they made the first
    measured prediction ~20x too long on an H100)."""
    from alto_ray.cluster.predict import StepClock

    clock = StepClock()
    assert clock.observe("g0", now=0.0, steps=0) is None       # loading
    assert clock.observe("g0", now=30.0, steps=2) is None      # first steps done: the clock starts here
    assert clock.observe("g0", now=31.0, steps=2) is None      # no step since
    assert clock.observe("g0", now=32.0, steps=6) == pytest.approx(0.5)   # 4 steps since t=30
    assert clock.observe("g1", now=32.0, steps=3) is None      # each group its own clock
    assert clock.observe("g1", now=35.0, steps=9) == pytest.approx(0.5)
    assert clock.observe("g0", now=40.0, steps=6) is None
    assert clock.observe("g0", now=42.0, steps=10) == pytest.approx(2.5)  # from the last change (t=32)
