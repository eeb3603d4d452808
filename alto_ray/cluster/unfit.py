"""Queued tasks that fit no node now: left out of the plan, with the reason, until one fits.

A task fits some node when it registers (`register_task` refuses it otherwise), but it can stop
fitting later: its only large node died and no worker type the autoscaler can start would host
it, or the nodes shrank. Planning it would raise `InfeasibleTaskError` for every tenant's call,
so the coordinator plans only the tasks that fit and keeps the others queued, *blocked*: the
reason (the task, its sizes, the nodes' capacity) is in their `request_groups` answer and in
`status()`, `describe()` and `metrics()`. Nodes are re-read at each plan (and the launcher's
config while a task is blocked), so a blocked task is planned as soon as a node that fits is up
or can be started. Running groups stay where they are.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Collection, Iterable, Mapping, Sequence

from alto_ray.cluster.allocator_problem import check_memory
from alto_ray.cluster.plan import GIB, InfeasibleTaskError, NodeSpec, Plan, TaskSpec

logger = logging.getLogger(__name__)

BLOCKED = "blocked"              # status() of a queued task that fits no node now


def unfit_reasons(specs: Iterable[TaskSpec], nodes: Sequence[NodeSpec],
                  potential: Collection[str] = ()) -> dict[str, str]:
    """Task name -> why it fits no node of `nodes` (`potential`: the names of those not up)."""
    out = {}
    for spec in specs:
        try:
            if not nodes:
                raise InfeasibleTaskError(f"task {spec.name!r}: no node to plan on")
            check_memory(spec, nodes)
        except InfeasibleTaskError as err:
            out[spec.name] = f"{err}; {capacity(nodes, potential)}"
    return out


def capacity(nodes: Sequence[NodeSpec], potential: Collection[str] = ()) -> str:
    """The nodes planned on, up and startable, as counts of each GPU count and size."""
    def kinds(group: list[NodeSpec]) -> str:
        counts = Counter((n.num_gpus, n.gpu_memory_bytes) for n in group)
        return ", ".join(f"{k} x {g} GPUs of {m / GIB:.1f} GiB" for (g, m), k in sorted(counts.items()))

    up = [n for n in nodes if n.name not in potential]
    startable = [n for n in nodes if n.name in potential]
    return (f"planned over {len(up)} node{'' if len(up) == 1 else 's'} up ({kinds(up) or 'none'}) and "
            + (f"{len(startable)} the autoscaler can start ({kinds(startable)})" if startable
               else "none the autoscaler can start"))


def note_changes(before: Mapping[str, str], now: Mapping[str, str]) -> None:
    """Log the tasks that became blocked, or can be planned again."""
    for name in now.keys() - before.keys():
        logger.warning("alto coordinator: task %s fits no node now, left out of the plan: %s", name, now[name])
    for name in before.keys() - now.keys():
        logger.warning("alto coordinator: task %s fits a node again and is planned", name)


def queue_position(plan: Plan, queued: Mapping[str, int], unfit: Collection[str], task_id: str) -> int:
    """1-based place of a queued task (`queued`: name -> arrival order): the planned ones by
    planned start, then the blocked ones (not in the plan) by arrival."""
    order = sorted(queued, key=lambda t: (t in unfit, plan.task_start(t) or 0.0, queued[t], t))
    return 1 + order.index(task_id)


def describe(unfit: Mapping[str, str]) -> str:
    lines = [f"  {name}: {why}" for name, why in sorted(unfit.items())]
    return "\nfits no node now (queued, left out of the plan):\n" + "\n".join(lines) if lines else ""
