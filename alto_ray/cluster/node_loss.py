"""Groups lost with their node: recorded by the coordinator, told to the tenant.

When a node dies, its `AdapterGroup` actors die with it (their trials fail with Ray's
`ActorDiedError`), and the coordinator releases the groups (`Coordinator._refresh_nodes`): their
placement groups are removed. The coordinator records one `NodeLoss` per task and node (which
groups, the node's id, address and Ray's death reason, when, and whether the task was left
with no group and queued again), persists it with its state, shows it in `metrics()` and
`describe()`, keeps it in the task's finished record, and answers `node_losses(task)`, which
the tenant polls. A node that died while the coordinator was down is recorded the same way when
it restarts (`NodeLossLog.reattach`, `while_coordinator_down`): the state file names each
group's node and node id; Ray's node table gives the address and the death reason.

The tenant warns, naming the node and the groups, and republishes its placement without them
(`publish_grant`: Ray's key-value store, one key per tenant session, which `GrantedPlacement`
reads in the trial processes). Tune restores the failed trials from their checkpoints into the
groups left; a task left with none queues for new groups, and the restored trials join those.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import ray

from alto_ray.cluster.gcs import NODES, bounded_read
from alto_ray.cluster.nodes import is_potential, lookup_pg, remove_pg
from alto_ray.cluster.plan import NodeSpec

logger = logging.getLogger(__name__)

KV_NAMESPACE = "alto"
MAX_PER_TASK = 20                # a flapping cluster must not grow the state file without bound


@dataclass(frozen=True)
class NodeLoss:
    """One task's groups lost with one node."""

    task_id: str
    node: str                    # the coordinator's name of the node (its address)
    node_id: Optional[str]       # Ray's node id
    address: Optional[str]
    reason: str                  # Ray's death reason of the node, if it gave one
    groups: tuple[int, ...]
    pg_names: tuple[str, ...]
    at: float                    # when the coordinator noticed
    requeued: bool               # no group left: the task is queued again
    while_coordinator_down: bool = False   # noticed when the coordinator restarted

    def describe(self) -> str:
        ident = f" (node id {self.node_id[:12]})" if self.node_id else ""
        why = f", {self.reason}" if self.reason else ""
        left = "no group left, queued again" if self.requeued else "the task keeps its other groups"
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        when = f"while the coordinator was down (noticed at {when})" if self.while_coordinator_down else f"at {when}"
        groups = ", ".join(map(str, self.groups))
        return (f"node {self.address or self.node}{ident} died{why} {when}: lost group(s) {groups} "
                f"({', '.join(self.pg_names)}); {left}")


class NodeLossLog:
    """The losses of each task the coordinator still holds (running, queued, or just finished)."""

    def __init__(self) -> None:
        self.by_task: dict[str, list[NodeLoss]] = {}

    def record(self, task_id: str, grants: Iterable[Any], node_ids: dict[str, Optional[str]], requeued: bool,
               down: bool = False) -> list[NodeLoss]:
        """Record `grants` (GroupGrants of one task) as lost, one NodeLoss per node they were on;
        `node_ids`: node name -> Ray node id as the coordinator knew them (None: told by Ray's
        table of dead nodes when the name singles one out). `down`: while the coordinator was down.
        A group already recorded lost with that node is left out (a tenant's `adopt` names it)."""
        dead = _dead_nodes()
        ids = {node: node_ids.get(node) or _dead_node_id(node, dead) for node in {g.node for g in grants}}
        known = {(x.node_id or x.node, pg) for x in self.by_task.get(task_id, []) for pg in x.pg_names}
        by_node: dict[str, list[Any]] = {}
        for g in grants:
            if (ids[g.node] or g.node, g.pg_name) not in known:
                by_node.setdefault(g.node, []).append(g)
        out = []
        for node, gs in by_node.items():
            node_id = ids[node]
            info = dead.get(node_id or "", {})
            gs.sort(key=lambda g: g.group_index)
            loss = NodeLoss(task_id, node, node_id, info.get("NodeManagerAddress") or node.split("/")[0],
                            str(info.get("DeathReasonMessage") or ""), tuple(g.group_index for g in gs),
                            tuple(g.pg_name for g in gs), time.time(), requeued, down)
            logger.warning("alto coordinator: task %s: %s", task_id, loss.describe())
            out.append(loss)
        self.by_task[task_id] = (self.by_task.get(task_id, []) + out)[-MAX_PER_TASK:]
        return out

    def reattach(self, task_id: str, grants: list[Any], nodes: Sequence[NodeSpec]) -> dict[int, Any]:
        """A task's groups known from before the coordinator (re)started (its state file, or a
        tenant's `adopt`): those on a node of `nodes` (renamed to its name now: nodes sharing an
        address are named at each start) or a potential one, whose placement group still exists,
        by group index. A group whose node Ray lists dead died with it while the coordinator was
        down: it is recorded (once) and its placement group removed."""
        by_id = {n.ray_node_id: n.name for n in nodes if n.ray_node_id}
        names, dead = {n.name for n in nodes}, _dead_nodes()
        live, lost = {}, []
        for g in grants:
            if g.node_id in by_id:
                g.node = by_id[g.node_id]
            elif not (is_potential(g.node) or (g.node_id is None and g.node in names)):  # no id: an older file
                if (g.node_id or _dead_node_id(g.node, dead)) in dead:
                    lost.append(g)
                continue                         # else alive but not planned on (the mode changed): left be
            g.placement_group = lookup_pg(g.pg_name)
            if g.placement_group is not None:
                live[g.group_index] = g
        if lost:
            self.record(task_id, lost, {g.node: g.node_id for g in lost}, requeued=not live, down=True)
            for g in lost:
                pg = lookup_pg(g.pg_name)
                if pg is not None:
                    remove_pg(pg)
        return live

    def of(self, task_id: Optional[str] = None) -> list[NodeLoss]:
        if task_id is not None:
            return list(self.by_task.get(task_id, []))
        return [x for losses in self.by_task.values() for x in losses]

    def tag(self, task_id: str, answer: dict) -> dict:
        """A reply to the tenant, with the task's losses when it has any."""
        losses = self.of(task_id)
        return {**answer, "node_losses": losses} if losses else answer

    def pop(self, task_id: str) -> list[dict]:
        """Forget a task's losses (it finished or withdrew); JSON-friendly, for its finished record."""
        return [dataclasses.asdict(x) for x in self.by_task.pop(task_id, [])]

    def to_json(self) -> dict[str, list[dict]]:
        return {t: [dataclasses.asdict(x) for x in losses] for t, losses in self.by_task.items()}

    def load(self, data: dict[str, list[dict]]) -> None:
        for t, losses in data.items():
            self.by_task[t] = [NodeLoss(**{**x, "groups": tuple(x["groups"]), "pg_names": tuple(x["pg_names"])})
                               for x in losses]

    def describe(self) -> str:
        lines = [f"  {x.task_id}: {x.describe()}" for x in sorted(self.of(), key=lambda x: x.at)]
        return "\nnode losses:\n" + "\n".join(lines) if lines else ""


def _dead_nodes() -> dict[str, dict[str, Any]]:
    """`ray.nodes()` entries of the dead nodes, by node id (Ray keeps them, with the reason);
    none when the GCS does not answer in time."""
    try:
        return {n["NodeID"]: n for n in bounded_read(NODES, ray.nodes) if not n.get("Alive")}
    except Exception:  # noqa: BLE001 - the loss is recorded without the address then (a timeout too)
        return {}


def _dead_node_id(name: str, dead: dict[str, dict[str, Any]]) -> Optional[str]:
    """The id of the dead node the coordinator named `name` (its address, or `address/<id8>`),
    when only one dead node fits."""
    address, _, prefix = name.partition("/")
    hits = [i for i, n in dead.items() if n.get("NodeManagerAddress") == address and i.startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


# -- the grant the trials read ----------------------------------------------------------------------
def grant_key(task_name: str, session: str) -> str:
    return f"grant:{task_name}:{session}"


def publish_grant(key: str, groups: list[Any]) -> None:
    """Make `groups` (GroupSpecs) the placement the task's trials read from now on."""
    from ray import cloudpickle
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, cloudpickle.dumps(list(groups)), overwrite=True, namespace=KV_NAMESPACE)


def read_grant(key: str) -> Optional[list[Any]]:
    """The groups last published under `key`; None when none were (or Ray is not connected)."""
    try:
        from ray import cloudpickle
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return None
        raw = _internal_kv_get(key, namespace=KV_NAMESPACE)
        return None if raw is None else list(cloudpickle.loads(raw))
    except Exception as err:  # noqa: BLE001 - the fixed list still works
        logger.debug("reading the grant %s: %s", key, err)
        return None


def drop_grant(key: str) -> None:
    try:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=KV_NAMESPACE)
    except Exception as err:  # noqa: BLE001 - best effort: the key names a finished session
        logger.debug("dropping the grant %s: %s", key, err)
