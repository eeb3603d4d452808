"""`lora_trainable(task)`: the Tune trainable whose adapter trains inside a shared `AdapterGroup`.

The trial is a thin class `tune.Trainable` (about 0 CPU, no GPU: the device lives in the
group). A class rather than a function trainable, because Tune calls `cleanup()` on every way
out (done, STOP, PAUSE, error) and that is where the adapter leaves its group, freeing the slot.

Each result (one per `task.steps_per_report` engine steps; `loss` is their mean):
`loss` (NaN when the step was non-finite), `eval_loss` (always present so it can be the Tune
metric: computed on the first step, every `eval_every` steps and the last one, carried in
between; `eval_step` says when), `tokens` (cumulative), `lr`, `grad_norm`, `step`, `max_steps`
(AltoScheduler's planned steps), `done`, and diagnostics `alto_task`, `alto_group`,
`alto_active`, `alto_queued`, `queue_wait_s`, `group_step_s` (the last step's engine time),
`alto_graph_replays` (the group's CUDA-graph replays so far; 0 with `cuda_graphs` off),
`time_in_group_s` and `group_idle_s` (engine time and the group's idle time before each step,
summed over the report's steps: idle time means the group waited for a trial), and the split of
the former into `group_lock_wait_s` (membership changes and checkpoints of other trials),
`group_engine_s` and `group_eval_s`. A trial whose loss stays
non-finite for `task.nonfinite_patience` steps ends itself (for schedulers that do not stop it).

Checkpoints: the trainable asks Tune for one every `task.checkpoint_every` engine steps and at
the end of training (`should_checkpoint` in the result), so `tune.CheckpointConfig` needs no
`checkpoint_frequency` / `checkpoint_at_end`; use its `num_to_keep` to bound disk use. PAUSE,
restarts after errors (`FailureConfig`), `Tuner.restore` and `reuse_actors=True` (PBT) all
resume exactly from the checkpoint.
"""

from __future__ import annotations

import re

import logging
import math
import os
import time
import zlib
from typing import Any, Dict, List, Optional, Type

import ray
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory

from alto_ray.tune.checkpoint import STATE_FILE, SUMMARY_FILE, read_files, reported_step, write_files
from alto_ray.tune.group import NAMESPACE, AdapterGroup
from alto_ray.tune.task import GroupSpec, LoRATask

logger = logging.getLogger(__name__)

TRIAL_CPU = 0.01  # the trial only waits on its group; it must not block other trials' slots
_LEAVE_TIMEOUT_S = 30.0


class LoRATrainable(tune.Trainable):
    """Base class; `lora_trainable(task)` binds a task to a subclass."""

    task: LoRATask  # set on the subclass

    @classmethod
    def default_resource_request(cls, config: Dict[str, Any]) -> PlacementGroupFactory:
        return PlacementGroupFactory([{"CPU": TRIAL_CPU}])

    # -------------------------------------------------------------- lifecycle
    def setup(self, config: Dict[str, Any]) -> None:
        self._joined = self._reserved = False
        self._restore: Optional[Dict[str, bytes]] = None
        self._exit_reason = "stopped"
        self._step = 0
        self._id = self.trial_id  # our name in the group (reset_config changes trial_id first)
        self._adapter = self.task.adapter_dict(config)
        self._group, spec = connect(self.task, self._id)
        self._group_name = spec.name
        problem = self._call(self._group.check.remote(self._adapter, self._id))
        if problem:  # fails this trial only, before it joins any group
            raise ValueError(problem)
        self._reserved = True

    def step(self) -> Dict[str, Any]:
        try:
            if not self._joined:
                self._join()
            results: List[Dict[str, Any]] = self._call(
                self._group.next_results.remote(self._id, self.task.steps_per_report))
        except BaseException:
            self._exit_reason = self._exit_reason if self._exit_reason == "group_lost" else "error"
            raise
        result = _merge(results)
        prev, self._step = self._step, int(result["step"])
        every = self.task.checkpoint_interval
        if result["done"]:
            self._exit_reason = "done" if result["finite"] else "nonfinite"
            result["should_checkpoint"] = bool(result["finite"])
        elif self._step // every > prev // every:
            result["should_checkpoint"] = True
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> Optional[Dict[str, Any]]:
        if self._joined:
            files = self._call(self._group.get_state.remote(self._id))
        elif self._restore is not None:  # restored but not stepped since: keep what we had
            files = self._restore
        else:  # nothing trained yet: an empty checkpoint means "start fresh"
            files = {SUMMARY_FILE: b'{"format": 1, "empty": true}'}
        write_files(checkpoint_dir, files)
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        path = checkpoint if isinstance(checkpoint, str) else checkpoint.path
        files = read_files(path) if os.path.isfile(os.path.join(path, STATE_FILE)) else None
        if self._joined:  # restored in place (e.g. PBT): swap the adapter's state
            self._leave("restored")
        self._restore = files
        self._step = reported_step(files)

    def cleanup(self) -> None:
        self._leave(self._exit_reason)

    def reset_config(self, new_config: Dict[str, Any]) -> bool:
        """Actor reuse (`TuneConfig(reuse_actors=True)`, e.g. under PBT): the previous trial's
        adapter leaves its group, the new trial starts as a fresh `setup`."""
        self._leave(self._exit_reason)
        self.setup(new_config)
        return True

    # -------------------------------------------------------------- group calls
    def _join(self) -> None:
        owner = _current_actor()
        group, name = self._group, self._group_name
        for attempt in range(5):
            try:
                self._call(group.join.remote(self._id, self._adapter, self._restore, owner))
            except RuntimeError as err:  # group lost or closing since setup: find a live one
                if attempt == 4:
                    raise
                logger.info("rejoining after %s", err)
                group, spec = connect(self.task, self._id)
                name = self._group_name = spec.name
                continue
            self._group, self._group_name, self._joined = group, name, True
            self._restore, self._exit_reason = None, "stopped"
            return

    def _leave(self, reason: str) -> None:
        if not (self._joined or self._reserved) or self._group is None:
            return
        self._joined = self._reserved = False
        try:
            ray.get(self._group.leave.remote(self._id, reason), timeout=_LEAVE_TIMEOUT_S)
        except Exception as err:  # group gone: nothing to leave
            logger.debug("leave %s: %s", self._group_name, err)

    def _call(self, ref: Any) -> Any:
        """ray.get that turns a lost group into a plain error Tune can retry from a checkpoint."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._exit_reason = "group_lost"
            self._joined = self._reserved = False
            raise RuntimeError(
                f"AdapterGroup {self._group_name or '?'} was lost{lost_node(err)}; the trial fails and "
                f"Tune restores it from its last checkpoint (FailureConfig.max_failures)") from err


# ---------------------------------------------------------------------- finding a group
def group_options(spec: GroupSpec) -> Dict[str, Any]:
    """Ray actor options of a group: named, detached (outlives the trial that made it)."""
    res = dict(spec.resources)
    cpus, gpus = float(res.pop("CPU", 0.0)), float(res.pop("GPU", 0.0))
    opts: Dict[str, Any] = {"name": spec.name, "namespace": NAMESPACE, "get_if_exists": True,
                            "lifetime": "detached", "num_cpus": cpus, "num_gpus": gpus}
    if res:
        opts["resources"] = res
    opts["scheduling_strategy"] = "DEFAULT"  # not inside the calling trial's placement group
    opts.update(spec.options)
    return opts


REGRANT_WAIT_S = 600.0  # how long a trial waits for its task's new groups after a node loss


def connect(task: LoRATask, trial_id: str = "", attempts: int = 20,
            backoff_s: float = 0.5, regrant_wait_s: float = REGRANT_WAIT_S) -> "tuple[Any, GroupSpec]":
    """Get or create the task's groups and return the least-loaded live one.

    Ties (typical at a cold start, when every trial waits for the groups to load and then reads
    the same empty loads) are broken round-robin by the trial's number, so trials that start
    together still spread evenly. A group that just died or is closing (idle) is retried: its
    name becomes free again, and the next `get_if_exists` creates a fresh actor. Groups whose
    placement group was removed (the coordinator released them: their node died) are skipped;
    the placement is read again at each attempt, so a new grant is found. While a placement
    that can change (``may_change``: the tenant re-publishes it) offers no usable group, the
    trial waits up to ``regrant_wait_s`` for one without spending its attempts: a task queued
    for new groups may wait minutes (an autoscaler's node), and each failed trial start would
    use up one of Tune's ``max_failures``.
    """
    salt = _trial_number(trial_id)
    last_err: Optional[BaseException] = None
    can_change = bool(getattr(task.placement, "may_change", False))
    deadline = time.monotonic() + regrant_wait_s
    for attempt in range(attempts):
        specs, removed = _usable_specs(task)
        while can_change and not specs and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
            specs, removed = _usable_specs(task)
        if removed:  # Ray would keep a group aimed there pending forever
            last_err = RuntimeError(f"the placement groups of {', '.join(removed)} were removed (their node "
                                    "died, or the task gave them back)")
        elif not specs:
            last_err = RuntimeError("the task holds no group now (queued for new ones after losing its node?)")
        handles = [AdapterGroup.options(**group_options(s)).remote(task, s) for s in specs]
        refs = [h.load.remote() for h in handles]
        best = None
        for spec, handle, ref in zip(specs, handles, refs):
            try:
                load = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # died (or failed to start)
                last_err = err
                if _failed_in_init(err):
                    raise
                continue
            if load["closing"]:
                continue
            key = (load["active"] + load["queued"] + load["reserved"], (spec.index - salt) % len(specs))
            if best is None or key < best[0]:
                best = (key, handle, spec)
        if best is not None:
            return best[1], best[2]
        time.sleep(backoff_s * min(attempt + 1, 4))
    raise RuntimeError(f"no live AdapterGroup for task {task.task_name}: {last_err}")


def _usable_specs(task: LoRATask) -> "tuple[List[GroupSpec], List[str]]":
    """The task's groups now, less those whose placement group was removed (and their names)."""
    specs: List[GroupSpec] = []
    removed: List[str] = []
    for s in task.group_specs():
        if _placement_removed(s):
            removed.append(s.name)
        else:
            specs.append(s)
    return specs, removed


def _placement_removed(spec: GroupSpec) -> bool:
    """Whether the placement group the spec schedules its group into was removed (the
    coordinator released it); Ray keeps an actor aimed at a removed one pending forever."""
    pg = getattr(spec.options.get("scheduling_strategy"), "placement_group", None)
    if pg is None:
        return False
    from ray.util.placement_group import placement_group_table

    try:
        return placement_group_table(pg).get("state") == "REMOVED"
    except Exception:  # noqa: BLE001 - unknown to Ray: let the actor creation say so
        return False


def lost_node(err: BaseException) -> str:
    """' with its node <address> (node id …)' when Ray says the actor died with its node."""
    found = re.search(r"node has died\. Node Id: ([0-9a-f]+)", str(err))
    if not found:
        return ""
    node_id = found.group(1)
    address = next((n.get("NodeManagerAddress") for n in _nodes() if n.get("NodeID") == node_id), None)
    return f" with its node {address or '?'} (node id {node_id[:12]})"


def _nodes() -> List[Dict[str, Any]]:
    try:
        return ray.nodes()
    except Exception:  # noqa: BLE001 - the node id alone still names it
        return []


def _trial_number(trial_id: str) -> int:
    """Tune trial ids end in a running number ("a1b2c_00007"); other ids hash."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else zlib.crc32(trial_id.encode())


def _failed_in_init(err: BaseException) -> bool:
    """A group whose constructor raised (bad model path, OOM loading) will not get better."""
    return bool(getattr(err, "actor_init_failed", False))


def lora_trainable(task: LoRATask) -> Type[LoRATrainable]:
    """A `tune.Trainable` class training `task`'s adapters in shared groups.

    Validates the task here, on the driver, so a missing model or dataset fails before Tune
    starts any actor.
    """
    task.validate()
    # Tune registers trainables by class name in one global registry: two tasks tuned from one
    # driver must not share a name, or the second registration would replace the first's class.
    safe = re.sub(r"\W", "_", task.task_name)
    return type(f"LoRATrainable_{safe}", (LoRATrainable,), {
        "task": task, "__module__": __name__,
        "__qualname__": f"lora_trainable.<locals>.LoRATrainable[{task.task_name}]"})


# ---------------------------------------------------------------------- helpers
def _merge(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One Tune result from `steps_per_report` engine steps: the mean loss, the latest rest."""
    out = dict(results[-1])
    if len(results) > 1:
        losses = [r["loss"] for r in results]
        out["loss"] = sum(losses) / len(losses) if all(map(math.isfinite, losses)) else float("nan")
        out["finite"] = all(r["finite"] for r in results)
        out["time_in_group_s"] = sum(r.get("group_step_s", 0.0) for r in results)
        for key in ("group_idle_s", "group_lock_wait_s", "group_engine_s", "group_eval_s"):
            out[key] = sum(r.get(key, 0.0) for r in results)
    return out


def _current_actor() -> Any:
    try:
        return ray.get_runtime_context().current_actor
    except Exception:  # not inside an actor (trainable used directly)
        return None
