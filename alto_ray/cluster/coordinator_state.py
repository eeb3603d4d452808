"""The coordinator's state file: what a restarted coordinator needs to carry on where it stopped.

The coordinator actor can die (killed, head restart) while its tenants train on: their groups
live in detached placement groups, and each tenant re-creates the coordinator on its next call.
The new one reads this file (JSON on the head node, `~/.alto/coordinator_state.json` by default,
rewritten atomically on every change) so that it neither forgets what it granted nor what
finished. It holds:

* `finished`: task -> its results record (results, prediction error, node losses);
* `running`: task -> spec, arrival order, driver job id, the tenant's grant key (where it
  publishes its placement, dropped if its driver dies) and granted groups (node, node id,
  placement group name, bundles); reloaded if a group's node is up and its placement group
  still exists, recorded lost if its node died meanwhile. A task that lost all its groups so
  is reloaded queued, keeping its place (arrival order), job id and grant key, as a task whose
  node dies while the coordinator runs: its tenant, re-registering, is told of the loss and
  granted new groups. One whose groups are gone with no node loss (its placement groups removed
  on a live node) is not reloaded, as nothing would tell its tenant to ask for new ones; it
  re-registers. Reloaded queued only under the queued tasks' conditions below;
* `queued` (since version 2): task -> spec, arrival order, driver job id, grant key; reloaded
  queued, so a restart keeps the queue's order (the tenants re-register within a poll, and a
  task registered again keeps its place) and the liveness check on restart finds a queued
  tenant that died. One registered without a job id is not reloaded: nothing could tell that
  its tenant died, and it would hold its place forever (its tenant, if alive, re-registers);
* `node_losses`, `abandoned`: the coordinator's logs of groups lost with their node and of tasks
  whose tenant's driver died;
* `ray_session`: the Ray cluster's session name when it was written. Job ids restart with every
  new cluster (`01000000`, ...), so a task saved under another session is not reloaded queued:
  its job id may name another cluster's live driver, which would keep the task queued (and
  granted GPUs) with no tenant behind it. Its tenant, if one is alive, registers again.

A key an older file lacks loads empty.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from alto_ray.cluster.liveness import LivenessWatch
from alto_ray.cluster.node_loss import NodeLossLog
from alto_ray.cluster.plan import NodeSpec, TaskSpec

VERSION = 2                                    # 2: queued tasks too


def ray_session() -> Optional[str]:
    """The connected Ray cluster's session name (new each time the cluster starts); None without
    Ray. Ray has no public read of it: one guarded private attribute."""
    try:
        from ray._private import worker

        return getattr(getattr(worker.global_worker, "node", None), "session_name", None)
    except Exception:  # noqa: BLE001 - another Ray: sessions are then never compared
        return None


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
    node_id: str | None = None                 # Ray's id of `node` (None: a potential node)

    def to_json(self) -> dict[str, Any]:
        """For the state file: all but the task id (its key there) and the placement group handle."""
        return {k: v for k, v in vars(self).items() if k not in ("task_id", "placement_group")}

    @classmethod
    def from_json(cls, task_id: str, saved: dict[str, Any]) -> "GroupGrant":
        """A saved group, its placement group not looked up (None)."""
        return cls(**{**saved, "task_id": task_id, "gpu_ids": tuple(saved["gpu_ids"]), "placement_group": None})


@dataclass
class TaskEntry:
    """The coordinator's record of one task it holds (not finished)."""

    spec: TaskSpec
    status: str = "queued"                     # queued | running | finished
    order: int = 0
    groups: dict[int, GroupGrant] = field(default_factory=dict)
    progress: bool = False                     # has reported measured progress
    measured_at: tuple[float, float] | None = None   # (when, predicted remaining s) at the first measured step
    job_id: str | None = None                  # Ray job of the tenant's driver (None: never abandoned)
    grant_key: str | None = None               # the tenant's published placement (Ray's KV), dropped if abandoned


def save(path: Path, tasks: Mapping[str, TaskEntry], finished: Mapping[str, dict], losses: NodeLossLog,
         liveness: LivenessWatch, session: Optional[str] = None) -> None:
    """Atomically write the state (JSON; results via str if they are not JSON)."""
    def saved(e: TaskEntry) -> dict[str, Any]:
        return {"spec": dataclasses.asdict(e.spec), "order": e.order, "job_id": e.job_id, "grant_key": e.grant_key}

    running = {t: {**saved(e), "groups": [g.to_json() for g in e.groups.values()]}
               for t, e in tasks.items() if e.status == "running"}
    queued = {t: saved(e) for t, e in tasks.items() if e.status == "queued"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "finished": dict(finished), "running": running,
                               "queued": queued, "node_losses": losses.to_json(), "abandoned": liveness.to_json(),
                               "ray_session": session},
                              indent=1, default=str))
    os.replace(tmp, path)


def load(path: Path, losses: NodeLossLog, liveness: LivenessWatch, nodes: Sequence[NodeSpec],
         session: Optional[str] = None) -> Optional[tuple[dict[str, dict], dict[str, TaskEntry]]]:
    """(finished, tasks by arrival order) from the file, None without one; `losses` and
    `liveness` get their logs. A running task keeps the groups still on a node of `nodes` whose
    placement groups exist; those of a node that died meanwhile are recorded lost
    (`NodeLossLog.reattach`). A task that lost all its groups so is reloaded queued, in its place,
    as one whose node dies while the coordinator runs; one left with none otherwise (its placement
    groups gone, no node died) is not reloaded (its tenant re-registers). A task is reloaded
    queued only if it has a job id (liveness can give it up) and the file was written in this
    Ray `session` (job ids restart with a new cluster)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    finished = dict(data.get("finished", {}))
    losses.load(data.get("node_losses", {}))
    liveness.load(data.get("abandoned", []))
    saved_session = data.get("ray_session")
    same_cluster = session is None or saved_session is None or saved_session == session
    tasks: dict[str, TaskEntry] = {}
    for name, r in data.get("running", {}).items():
        if name in finished:
            continue
        before = losses.of(name)
        groups = losses.reattach(name, [GroupGrant.from_json(name, g) for g in r["groups"]], nodes)
        if groups:
            tasks[name] = _entry(r, "running", groups)
        elif same_cluster and r.get("job_id") and any(x.requeued and x not in before for x in losses.of(name)):
            tasks[name] = _entry(r, "queued")     # its groups died with their node(s) meanwhile
    for name, r in (data.get("queued", {}) if same_cluster else {}).items():
        if name not in finished and name not in tasks and r.get("job_id"):
            tasks[name] = _entry(r, "queued")
    return finished, dict(sorted(tasks.items(), key=lambda item: item[1].order))


def _entry(saved: dict[str, Any], status: str, groups: Optional[dict[int, GroupGrant]] = None) -> TaskEntry:
    """A task of the file: spec, arrival order, job id, grant key (and its groups, running)."""
    return TaskEntry(TaskSpec(**saved["spec"]), status, saved.get("order", 0), groups or {},
                     job_id=saved.get("job_id"), grant_key=saved.get("grant_key"))
