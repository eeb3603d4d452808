"""The nodes the coordinator plans on: the alive ones, and those the autoscaler could start.

Alive nodes come from `ray.nodes()`. On a cluster with no GPU at all, and no GPU worker type the
autoscaler can start, CPU slots stand in for GPUs (tests, laptops). Otherwise the plan is in GPU
mode: each GPU worker type of the launcher's config (`capacity.launchable_worker_types`) adds
*potential nodes* `autoscale:<type>:<i>` (no Ray node id): up to the type's `max_workers`
(capped at `MAX_POTENTIAL_PER_TYPE`, so CP-SAT stays small) minus the alive nodes that look like
that type (same GPU count and the same custom resources, e.g. `alto_gpu_memory_gb`). A group the
plan puts on a potential node gets a placement group with no node target; the autoscaler starts a
node for it because it is pending. Potential nodes are planned busy for their start delay
(`startup_background`), so the plan only uses them when waiting for a new node beats the nodes up.

The coordinator actor itself is pinned to the head node (`on_head_node`): the launcher's config
and the coordinator's state file live there.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from alto_ray.cluster.plan import GIB, NodeSpec, RunningGroup
from alto_ray.tune.capacity import launchable_worker_types

DEFAULT_GPU_MEMORY_GB = 80.0
GPU_MEMORY_RESOURCE = "alto_gpu_memory_gb"     # optional per-node custom resource: GiB per GPU
POTENTIAL_PREFIX = "autoscale:"
MAX_POTENTIAL_PER_TYPE = 8
STARTING_TASK = "(node starting)"              # task id of the start-delay placeholder groups
_ACCELERATOR_GB = {"H100": 80, "H200": 141, "A100": 80, "A100-40G": 40, "A100-80G": 80, "L4": 24, "A10G": 24,
                   "L40S": 48, "B200": 180, "V100": 16, "T4": 16}
HEAD_RESOURCE = "node:__internal_head__"       # the resource Ray gives its head node only
_GENERIC = {"CPU", "GPU", "memory", "object_store_memory"}   # resources that do not tell node types apart

WorkerType = tuple[str, dict[str, float], int]


def alive_ray_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` entries of the alive nodes."""
    return [n for n in ray.nodes() if n.get("Alive")]


def head_node_id() -> str | None:
    """The alive head node's id: the node holding Ray's head resource (None if none shows it)."""
    return next((n["NodeID"] for n in alive_ray_nodes() if HEAD_RESOURCE in n["Resources"]), None)


def on_head_node() -> dict[str, Any]:
    """Actor options pinning it to the head node (hard node affinity): an actor created from a
    worker node's process would otherwise start there, where there is no launcher config.
    Empty (Ray's default placement) when no node shows the head resource."""
    node = head_node_id()
    return {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def gpu_worker_types(path: str | None = None) -> list[WorkerType]:
    """Launchable worker types that have GPUs (empty without a launcher config)."""
    return [t for t in launchable_worker_types(path) if t[1].get("GPU", 0) >= 1]


def gpu_mode(raw_alive: Sequence[dict[str, Any]], types: Sequence[WorkerType]) -> bool:
    """Plan GPUs when one is up or can be started: a GPU task then waits for the autoscaler
    instead of running on CPU slots."""
    return bool(types) or any(n["Resources"].get("GPU", 0) >= 1 for n in raw_alive)


def is_potential(name: str) -> bool:
    return name.startswith(POTENTIAL_PREFIX)


def alive_node_specs(raw_alive: Sequence[dict[str, Any]], use_gpu: bool, gpu_memory_gb: float | None,
                     cpu_slots_per_node: int | None, previous: dict[str, str] | None = None) -> list[NodeSpec]:
    """One NodeSpec per alive node with a GPU (or, not `use_gpu`, with CPUs).

    Names are the node's address (`address/<id8>` when several nodes share one); `previous`
    (node id -> name) keeps the names of nodes already known, so running groups, recorded by node
    name, never change node when another node on the same address joins or leaves.
    """
    previous = previous or {}
    counted = []
    for n in raw_alive:
        res = n["Resources"]
        count = int(res.get("GPU", 0)) if use_gpu else int(cpu_slots_per_node or res.get("CPU", 0))
        if count >= 1:
            counted.append((n, count))
    taken = {previous[n["NodeID"]] for n, _c in counted if n["NodeID"] in previous}
    nodes = []
    for n, count in sorted(counted, key=lambda x: (x[0]["NodeManagerAddress"], x[0]["NodeID"])):
        name = previous.get(n["NodeID"])
        if name is None:
            name = n["NodeManagerAddress"]
            if name in taken:
                name = f"{name}/{n['NodeID'][:8]}"
            taken.add(name)
        nodes.append(NodeSpec(name, count, int(gpu_memory_gb_of(n["Resources"], gpu_memory_gb) * GIB), n["NodeID"]))
    return nodes


def potential_node_specs(raw_alive: Sequence[dict[str, Any]], types: Sequence[WorkerType],
                         gpu_memory_gb: float | None, keep: Iterable[str] = ()) -> list[NodeSpec]:
    """Nodes the autoscaler could still start, per GPU worker type: min(max_workers, cap) minus
    the alive nodes of that type; names in `keep` (potential nodes holding granted groups whose
    node is not placed yet) stay whatever the count says."""
    keep = set(keep)
    out = []
    for type_name, res, most in types:
        prefix = f"{POTENTIAL_PREFIX}{type_name}:"
        up = sum(_looks_like(n["Resources"], res) for n in raw_alive)
        names = sorted((k for k in keep if k.startswith(prefix)), key=lambda k: int(k.rsplit(":", 1)[1]))
        i = 0
        while len(names) < min(most, MAX_POTENTIAL_PER_TYPE) - up:
            if f"{prefix}{i}" not in keep:
                names.append(f"{prefix}{i}")
            i += 1
        memory = int(gpu_memory_gb_of(res, gpu_memory_gb) * GIB)
        out += [NodeSpec(name, int(res["GPU"]), memory, None) for name in names]
    return out


def startup_background(potential: Sequence[NodeSpec], used: dict[str, list[tuple[tuple[int, ...], float]]],
                       delay_s: float, now: float) -> tuple[list[RunningGroup], dict[str, float]]:
    """Placeholder running groups keeping each potential node's free GPUs busy until it can be up,
    and that time (s from now) per node. `used`: node -> (gpu ids, granted at) of its groups; a
    node with groups is starting since its first grant."""
    background, ready = [], {}
    for node in potential:
        groups = used.get(node.name, [])
        left = max(delay_s - (now - min(at for _ids, at in groups)), 0.0) if groups else delay_s
        ready[node.name] = left
        busy = {g for ids, _at in groups for g in ids}
        free = tuple(g for g in range(node.num_gpus) if g not in busy)
        if left > 0 and free:
            background.append(RunningGroup(STARTING_TASK, len(background), node.name, free, left))
    return background, ready


def potential_hosts(grants: Iterable[Any]) -> dict[str, list[tuple[tuple[int, ...], float]]]:
    """Potential node -> (gpu ids, granted at) of the groups (GroupGrants) granted there, not placed yet."""
    out: dict[str, list[tuple[tuple[int, ...], float]]] = {}
    for g in grants:
        if is_potential(g.node):
            out.setdefault(g.node, []).append((tuple(g.gpu_ids), g.started_at))
    return out


def rehome(grants: Sequence[Any], alive: Sequence[NodeSpec]) -> bool:
    """Groups (GroupGrants) granted on potential nodes whose placement group got placed now run on
    that alive node: record it (its id, GPU ids free there), so the plan sees the real node busy.
    True if any moved."""
    by_id = {n.ray_node_id: n for n in alive}
    moved = False
    for g in grants:
        node = by_id.get(placed_node_id(g.placement_group)) if is_potential(g.node) else None
        if node is None:
            continue
        used = [x for h in grants if h.node == node.name for x in h.gpu_ids]
        g.node, g.node_id = node.name, node.ray_node_id
        g.gpu_ids, moved = free_gpu_ids(node.num_gpus, used, len(g.gpu_ids)), True
    return moved


def free_gpu_ids(num_gpus: int, used: Iterable[int], k: int) -> tuple[int, ...]:
    """k GPU ids of a node not in `used` (the first k if too few are free: Ray placed the group,
    so the record of another group there is stale)."""
    busy = set(used)
    free = [g for g in range(num_gpus) if g not in busy]
    return tuple(free[:k]) if len(free) >= k else tuple(range(k))


def placed_node_id(pg: Any) -> str | None:
    """The node id a created placement group's first bundle sits on (None while pending)."""
    from ray.util.placement_group import placement_group_table

    try:
        table = placement_group_table(pg)
    except Exception:  # noqa: BLE001 - removed / unknown: not placed
        return None
    if table.get("state") != "CREATED":
        return None
    return (table.get("bundles_to_node_id") or {}).get(0) or None


def gpu_memory_gb_of(res: dict[str, float], override: float | None) -> float:
    """Override > node resource alto_gpu_memory_gb > accelerator_type table > 80 GiB."""
    if override:
        return float(override)
    if res.get(GPU_MEMORY_RESOURCE):
        return float(res[GPU_MEMORY_RESOURCE])
    for key in res:
        if key.startswith("accelerator_type:") and key.split(":", 1)[1] in _ACCELERATOR_GB:
            return float(_ACCELERATOR_GB[key.split(":", 1)[1]])
    return DEFAULT_GPU_MEMORY_GB


def _looks_like(node_res: dict[str, float], type_res: dict[str, float]) -> bool:
    """Whether an alive node is of a worker type: the same GPU count and custom resources (the
    launcher gives a type's `resources` to `ray start`); CPU/memory may differ."""
    if node_res.get("GPU", 0) != type_res.get("GPU", 0):
        return False
    return all(node_res.get(k) == v for k, v in type_res.items() if k not in _GENERIC)


# -- the coordinator's placement groups (detached, named `alto:<task>:<group>`) -------------------------
def create_pg(bundles: list[dict[str, float]], strategy: str, name: str, node_id: str | None) -> Any:
    """A fresh placement group under `name` (an old one of that name is removed), aimed at the
    plan's node when Ray takes a soft target."""
    old = lookup_pg(name)
    if old is not None:
        remove_pg(old)
    kwargs: dict[str, Any] = dict(strategy=strategy, name=name, lifetime="detached")
    if node_id and strategy == "STRICT_PACK":
        kwargs["_soft_target_node_id"] = node_id
    try:
        return placement_group(bundles, **kwargs)
    except (TypeError, ValueError):
        kwargs.pop("_soft_target_node_id", None)
        return placement_group(bundles, **kwargs)


def lookup_pg(name: str) -> Any:
    """The placement group of that name, None when there is none."""
    try:
        return get_placement_group(name)
    except ValueError:
        return None


def remove_pg(pg: Any) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already gone (owner died, removed twice): nothing to free
        pass
