"""A tenant: one Tune run of one `LoRATask` whose adapter groups the cluster coordinator places.

The driver that runs `Tuner.fit()` is the tenant. It registers the task with the coordinator
(sizes from the engine's memory estimates, work from the duration prior), waits in the queue
until the plan starts it, then hands Tune a `GrantedPlacement`: the task's `placement` seam,
returning one `GroupSpec` per granted group whose options pin the `AdapterGroup` actor into the
group's placement-group bundle. The placement is a list (picklable), because every trial
process calls it; it prefers the list the tenant last published in Ray's key-value store (one
read), so trials Tune restores after a group was lost find the groups left or granted anew. All
talking to the coordinator stays in the driver:

* a progress thread polls the group actors (`describe()`) and reports measured step times and
  remaining adapter-steps (early exits shrink them), so re-planning uses measurements;
* if the coordinator dies (killed, head restart), calls re-create it (it reloads its JSON
  state), re-register the task idempotently and re-attach its running groups; training never
  stops, since groups live in detached placement groups;
* a node that dies takes its groups (and their trials) with it; the coordinator releases them,
  and the progress thread's next poll (`check_losses`) warns naming the node and the groups,
  drops them from the placement and, when no group is left, queues for new ones. The trials
  fail with an error naming the node and Tune restores them (`FailureConfig.max_failures`) from
  their checkpoints into the groups left or the new ones; finished trials keep their results;
* `finish()` reports the best result; a failed fit `withdraw`s instead, freeing the groups.

`run_tenant(task, param_space, tune_config)` does all of it around one `Tuner.fit()`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alto_ray.cluster.allocator_problem import check_memory
from alto_ray.cluster.coordinator import GroupGrant, get_coordinator
from alto_ray.cluster.liveness import register_with_job_id
from alto_ray.cluster.node_loss import NodeLoss, drop_grant, grant_key, publish_grant, read_grant
from alto_ray.cluster.plan import TaskSpec
from alto_ray.cluster.predict import StepClock
from alto_ray.tune.group import NAMESPACE
from alto_ray.tune.task import RANK_LOCAL_TRAINER, GroupSpec, LoRATask

logger = logging.getLogger(__name__)

CPU_BUNDLE_CPUS = 0.5        # CPU-only cluster: a group slot takes half a CPU, leaving room for trials
_SIZE_KEYS = ("rank", "batch_size", "max_seq_len", "grad_accum")


class TaskAlreadyFinished(RuntimeError):
    """The coordinator already holds finished results under this task name."""


class GrantedPlacement:
    """`LoRATask.placement` for granted groups, safe to call in trial processes: the list the
    tenant last published under `key` (groups lost with a node left out, new grants in), else
    the groups granted first."""

    def __init__(self, groups: list[GroupSpec], tenant: Optional["Tenant"] = None,
                 key: Optional[str] = None) -> None:
        self.groups = list(groups)
        self.tenant = tenant             # driver only: not pickled into trials
        self.key = key

    @property
    def may_change(self) -> bool:
        """A published placement is re-published after a node loss: trials wait for it
        (`connect`'s `regrant_wait_s`) rather than fail when it lists no group for a while."""
        return self.key is not None

    def __call__(self, task: LoRATask) -> list[GroupSpec]:
        published = read_grant(self.key) if self.key else None
        return list(self.groups if published is None else published)

    def __reduce__(self) -> tuple:
        return (GrantedPlacement, (self.groups, None, self.key))

    def __repr__(self) -> str:
        return f"GrantedPlacement({[g.name for g in self.groups]})"


class Tenant:
    """Driver-side session of one task with the coordinator: register → acquire → report → finish."""

    def __init__(self, task: LoRATask, num_samples: int, *, param_space: Optional[dict] = None,
                 gpus_per_group: Optional[int] = None, max_groups: Optional[int] = None, weight: float = 1.0,
                 model_config: Any = None, backbone_bytes: Optional[int] = None,
                 adapter_bytes: Optional[int] = None, coordinator_options: Optional[dict] = None,
                 poll_s: float = 2.0, max_wait_s: Optional[float] = None) -> None:
        task.validate()
        self.base_task = task
        self.name = task.task_name
        self.num_samples = int(num_samples)
        self.poll_s = poll_s
        self.max_wait_s = max_wait_s
        self.coordinator_options = dict(coordinator_options or {})
        self.spec = task_spec(task, num_samples, param_space=param_space, gpus_per_group=gpus_per_group,
                              max_groups=max_groups, weight=weight, model_config=model_config,
                              backbone_bytes=backbone_bytes, adapter_bytes=adapter_bytes)
        self.grants: list[GroupGrant] = []
        self.task: Optional[LoRATask] = None   # the task with GrantedPlacement, once acquired
        self.reconnects = 0
        self.waits: list[dict] = []            # every "wait" answer while queued (position, eta_s, reason)
        self.registered = False                # register() got through: after a coordinator restart it queues
        self.granted_at: Optional[float] = None
        self.node_losses: list[NodeLoss] = []  # groups this task lost with their node, as told
        self.grant_key = grant_key(self.name, uuid.uuid4().hex[:12])   # this session's published placement
        self._coord: Any = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: set[str] = set()
        self._clock = StepClock()

    # -- coordinator calls ----------------------------------------------------------------------
    @property
    def coordinator(self) -> Any:
        with self._lock:
            if self._coord is None:
                self._coord = get_coordinator(**_default_options(self.coordinator_options))
            return self._coord

    def call(self, method: str, *args: Any, timeout_s: float = 60.0, **kwargs: Any) -> Any:
        """One coordinator call; a dead coordinator is re-created and the task re-registered."""
        for attempt in range(3):
            coord = self.coordinator
            try:
                return ray.get(getattr(coord, method).remote(*args, **kwargs), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                if attempt == 2:
                    raise
                self._reconnect(coord)
        raise AssertionError("unreachable")

    def _reconnect(self, dead: Any, deadline_s: float = 60.0) -> None:
        """Bring the coordinator back (it reloads its state), then re-register and re-attach."""
        with self._lock:
            if self._coord is not dead:          # another thread already reconnected
                return
            logger.warning("alto tenant %s: coordinator lost; re-creating it and re-registering", self.name)
            end = time.time() + deadline_s
            while True:
                coord = get_coordinator(**_default_options(self.coordinator_options))
                try:
                    ray.get(coord.status.remote(), timeout=10)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    if time.time() > end:
                        raise
                    time.sleep(0.5)             # the dead actor's name is not free yet
            self._coord = coord
            self.reconnects += 1
            register_with_job_id(lambda **kw: ray.get(coord.register_task.remote(self.spec, **kw)), self.name,
                                 requeue=self.registered, grant_key=self.grant_key)   # it fit then: queue
            if self.grants:
                ray.get(coord.adopt.remote(self.name, self.grants))

    # -- lifecycle ----------------------------------------------------------------------------------
    def register(self) -> str:
        """Check the task fits some node (ValueError naming it), then register (idempotent)."""
        check_memory(self.spec, self.call("nodes_view"))
        status = self.call("status").get(self.name)
        if status == "finished":
            results = self.call("finished_results").get(self.name, {}).get("results")
            raise TaskAlreadyFinished(f"task {self.name!r} already finished on this cluster (results: "
                                      f"{results}); give the LoRATask another name to tune it again")
        name = register_with_job_id(lambda **kw: self.call("register_task", self.spec, **kw), self.name,
                                    grant_key=self.grant_key)
        self.registered = True
        return name

    def acquire(self) -> LoRATask:
        """Block (backoff, logging the queue position) until granted and the groups are placed."""
        specs = self._acquire_groups()
        self.task = self.base_task.replace(placement=GrantedPlacement(specs, self, self.grant_key))
        return self.task

    def _acquire_groups(self) -> list[GroupSpec]:
        """Queue until granted, wait for the placement groups, publish their GroupSpecs. A task
        that fits no node now waits too (warning with the coordinator's reason), as long as
        `max_wait_s` allows: a node that fits may join or be started."""
        t0, backoff, reason = time.time(), 0.5, None
        while True:
            answer = self.call("request_groups", self.name)
            if answer["status"] == "granted":
                break
            if answer["status"] == "finished":
                raise TaskAlreadyFinished(f"task {self.name!r} already finished: {answer.get('results')}")
            waited = time.time() - t0
            self.waits.append({"position": answer["position"], "eta_s": answer.get("eta_s"), "at": time.time(),
                               "reason": answer.get("reason")})
            if self.max_wait_s is not None and waited > self.max_wait_s:
                why = f": {answer['reason']}" if answer.get("reason") else ""
                raise TimeoutError(f"task {self.name!r} still queued after {waited:.0f}s "
                                   f"(position {answer['position']}){why}")
            eta = answer.get("eta_s")
            if answer.get("reason") not in (None, reason):
                logger.warning("alto tenant %s: waiting for a node that fits (waited %.0fs): %s", self.name, waited,
                               answer["reason"])
            elif len(self.waits) == 1 or answer["position"] != self.waits[-2]["position"] or len(self.waits) % 15 == 0:
                logger.info("alto tenant %s: queued at position %d, planned start in %s (waited %.0fs)",
                            self.name, answer["position"], "?" if eta is None else f"{eta:.0f}s", waited)
            time.sleep(min(backoff, max(float(eta or backoff), 0.5)))
            backoff, reason = min(backoff * 1.5, 10.0), answer.get("reason")
        self.grants = list(answer["groups"])
        self.granted_at = time.time()
        for g in self.grants:                    # granted: the bundles may still be freeing up
            while True:
                try:
                    ray.get(g.placement_group.ready(), timeout=30)
                    break
                except ray.exceptions.GetTimeoutError:
                    waited = time.time() - self.granted_at
                    if self.max_wait_s is not None and waited > self.max_wait_s:
                        raise TimeoutError(f"task {self.name!r}: placement group {g.pg_name} {g.bundles} "
                                           f"not placeable after {waited:.0f}s (cluster changed?)") from None
                    logger.info("alto tenant %s: waiting for placement group %s", self.name, g.pg_name)
        specs = [group_spec(self.name, g, self.base_task.device) for g in self.grants]
        publish_grant(self.grant_key, specs)
        logger.info("alto tenant %s: granted %d group(s): %s", self.name, len(specs),
                    ", ".join(f"{g.pg_name}@{g.node}" for g in self.grants))
        return specs

    def start(self) -> LoRATask:
        """register + acquire + start progress reporting; returns the placed task."""
        self.register()
        try:
            task = self.acquire()
        except BaseException:
            self.withdraw()                      # leave the queue / free what was granted
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._progress_loop, name=f"alto-progress-{self.name}",
                                        daemon=True)
        self._thread.start()
        return task

    def stop_reporting(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def finish(self, results_summary: Any = None) -> None:
        """Record the results with the coordinator (persisted) and free the groups."""
        self.stop_reporting()
        self.call("task_finished", self.name, results_summary)
        drop_grant(self.grant_key)

    def withdraw(self) -> None:
        """Give the groups back without results (the Tuner failed)."""
        self.stop_reporting()
        drop_grant(self.grant_key)
        try:
            self.call("withdraw", self.name)
        except Exception as err:  # noqa: BLE001 - best effort on the failure path
            logger.warning("alto tenant %s: withdraw failed: %s", self.name, err)

    # -- progress --------------------------------------------------------------------------------------
    def _progress_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            for step in (self.report_once, self.check_losses):
                try:
                    step()
                except Exception as err:  # noqa: BLE001 - reporting must never stop training
                    logger.debug("alto tenant %s: %s failed: %s", self.name, step.__name__, err)

    def check_losses(self) -> list[NodeLoss]:
        """Groups lost with their node since the last check (the coordinator notices the dead node
        on this call): warn naming the node and groups, leave them out of the placement the
        trials read, and queue for new groups when none is left (blocks until granted)."""
        seen = {(x.node, x.at) for x in self.node_losses}
        new = [x for x in self.call("node_losses", self.name, timeout_s=30) if (x.node, x.at) not in seen]
        if not new or self.task is None:
            return []
        lost = {i for x in new for i in x.groups}
        self.node_losses += new
        self.grants = [g for g in self.grants if g.group_index not in lost]
        placement = self.task.placement
        placement.groups = [s for s in placement.groups if s.index not in lost]
        publish_grant(self.grant_key, placement.groups)
        left = ", ".join(s.name for s in placement.groups)
        for x in new:
            logger.warning("alto tenant %s: %s; its trials fail and Tune restores them from their checkpoints %s",
                           self.name, x.describe(), f"into the groups left ({left})" if left else
                           "once new groups are granted (the task is queued again)")
        if not placement.groups:
            try:
                placement.groups = self._acquire_groups()
            except Exception as err:  # noqa: BLE001 - e.g. max_wait_s: the restored trials fail
                logger.error("alto tenant %s: no new groups after losing its node(s): %s", self.name, err)
        return new

    def report_once(self) -> Optional[float]:
        """Poll the group actors and report step time + remaining work; the predicted remaining s."""
        snap = self.poll_groups()
        if snap is None:
            return None
        return self.call("report_progress", self.name, snap["step_time"], snap["remaining"], timeout_s=30,
                         adapters_in_group=snap["adapters_per_group"] or None,
                         max_trial_remaining_steps=snap["max_remaining"])

    def poll_groups(self) -> Optional[dict]:
        """Step time (s per group step, mean over groups that stepped) and remaining adapter-steps."""
        max_steps = self.base_task.max_steps
        now, times, active, left = time.time(), [], 0, []
        found = 0
        for spec in (self.task.placement.groups if self.task else []):
            try:
                info = ray.get(ray.get_actor(spec.name, namespace=NAMESPACE).describe.remote(), timeout=10)
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue                         # not created yet / idle-exited / busy
            found += 1
            per_step = self._clock.observe(spec.name, now, int(info["steps"]))
            if per_step is not None:
                times.append(per_step)
            active += int(info.get("active", 0))
            for trial, m in info["members"].items():
                self._seen.add(trial)
                if m["state"] in ("queued", "active"):
                    left.append(max(max_steps - int(m["step"]), 0))
        if not found:
            return None
        unseen = max(self.num_samples - len(self._seen), 0)
        left += [max_steps] * unseen
        return {"step_time": sum(times) / len(times) if times else 0.0, "remaining": sum(left),
                "max_remaining": max(left, default=0), "adapters_per_group": round(active / found)}

    def __enter__(self) -> "Tenant":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.withdraw()
        else:
            self.stop_reporting()


# -- building blocks ----------------------------------------------------------------------------------------
def task_spec(task: LoRATask, num_samples: int, *, param_space: Optional[dict] = None,
              gpus_per_group: Optional[int] = None, max_groups: Optional[int] = None, weight: float = 1.0,
              model_config: Any = None, backbone_bytes: Optional[int] = None,
              adapter_bytes: Optional[int] = None) -> TaskSpec:
    """The coordinator's view of a task: sizes from the engine's estimates (config only, no
    weights; the largest adapter the search space can draw), work from the duration prior.
    `gpus_per_group` (default: the task's) > 1 plans rank-local groups: the backbone is sharded
    over them, so each GPU holds 1/N of it plus its own adapters."""
    import torch

    from alto_ray.engine import AdapterConfig, estimate_adapter_bytes, estimate_backbone_bytes

    if num_samples < 1:
        raise ValueError(f"task {task.task_name!r}: num_samples must be >= 1, got {num_samples}")
    cfg = model_config if model_config is not None else _model_config(task)
    dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16}.get(task.dtype or "", torch.bfloat16)
    adapter = AdapterConfig.from_dict(task.adapter_dict(largest_config(param_space or {})))
    p_bytes = estimate_backbone_bytes(cfg, torch.float32)
    return TaskSpec(
        name=task.task_name,
        backbone_bytes=int(backbone_bytes if backbone_bytes is not None else estimate_backbone_bytes(cfg, dtype)),
        adapter_bytes=int(adapter_bytes if adapter_bytes is not None else estimate_adapter_bytes(cfg, adapter, dtype)),
        num_adapters=int(num_samples), gpus_per_group=int(gpus_per_group or task.gpus_per_group),
        max_groups=max_groups, weight=weight,
        params=p_bytes / 4.0, tokens_per_adapter_step=adapter.batch_size * adapter.max_seq_len * adapter.grad_accum,
        steps_per_adapter=task.max_steps)


def largest_config(param_space: dict) -> dict:
    """The largest value of each size-driving key (rank, batch, length) the space can draw."""
    out = {}
    for key in _SIZE_KEYS:
        if key in param_space:
            values = _values(param_space[key])
            if values:
                out[key] = max(values)
    return out


def count_trials(param_space: dict, num_samples: int) -> int:
    """Trials Tune will run: num_samples times every grid_search's length (top level)."""
    n = max(int(num_samples), 1)
    for v in param_space.values():
        if isinstance(v, dict) and "grid_search" in v:
            n *= max(len(v["grid_search"]), 1)
    return n


def _values(v: Any) -> list:
    if isinstance(v, dict) and "grid_search" in v:
        return [x for x in v["grid_search"] if isinstance(x, (int, float))]
    if hasattr(v, "categories"):                  # tune.choice
        return [x for x in v.categories if isinstance(x, (int, float))]
    if hasattr(v, "upper") and v.upper is not None:   # tune.randint / uniform: upper (exclusive)
        return [v.upper]
    return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else []


def _model_config(task: LoRATask) -> Any:
    if not isinstance(task.model, str):
        raise ValueError(f"task {task.task_name!r}: model is a factory; pass model_config= (or "
                         "backbone_bytes= and adapter_bytes=) so the coordinator can size it")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(task.model)


def group_spec(task_name: str, g: GroupGrant, device: str = "auto") -> GroupSpec:
    """The `AdapterGroup` of one grant, scheduled into its bundle 0.

    One bundle: the group takes it (its GPU, its CPUs). Several: a rank-local group, one rank
    worker per bundle (each takes its bundle's GPU and CPUs); the group's own process sits beside
    rank 0 taking nothing, so the grant's resources are exactly its ranks'.
    """
    strategy = PlacementGroupSchedulingStrategy(placement_group=g.placement_group,
                                                placement_group_bundle_index=0)
    name = f"alto:{task_name}:g{g.group_index}"
    if len(g.bundles) == 1:
        return GroupSpec(name=name, index=g.group_index, resources=dict(g.bundles[0]),
                         options={"scheduling_strategy": strategy})
    bundle = g.bundles[0]
    kwargs = {"num_ranks": len(g.bundles), "use_gpu": bundle.get("GPU", 0) > 0 and device != "cpu",
              "cpus_per_rank": float(bundle.get("CPU", 0.0)), "placement_group": g.placement_group,
              "bundle_indices": tuple(range(len(g.bundles)))}
    return GroupSpec(name=name, index=g.group_index, resources={"CPU": 0.0},
                     options={"scheduling_strategy": strategy}, trainer=RANK_LOCAL_TRAINER, trainer_kwargs=kwargs)


def _default_options(options: dict) -> dict:
    """On a CPU-only cluster a group slot takes half a CPU, so Tune's trials still find room."""
    opts = dict(options)
    if "cpus_per_gpu" not in opts and not ray.cluster_resources().get("GPU"):
        opts["cpus_per_gpu"] = CPU_BUNDLE_CPUS
    return opts


def coordinated(task: LoRATask, num_samples: int, **kwargs: Any) -> LoRATask:
    """Register, wait for the grant, start progress reporting: the task placed by the coordinator.

    Its `placement.tenant` is the `Tenant`: call `finish(results)` after `Tuner.fit()`.
    """
    return Tenant(task, num_samples, **kwargs).start()


def summarize(grid: Any, metric: str, mode: str) -> dict:
    """Best config / loss / checkpoint of a ResultGrid, JSON-friendly (for the coordinator)."""
    out: dict = {"metric": metric, "mode": mode, "num_trials": len(grid), "num_errors": grid.num_errors}
    try:
        best = grid.get_best_result(metric=metric, mode=mode, filter_nan_and_inf=True)
    except RuntimeError:
        return out
    value = best.metrics.get(metric) if best.metrics else None
    out.update(best_config={k: v for k, v in (best.config or {}).items() if _jsonable(v)},
               best_value=value if value is None or math.isfinite(value) else None,
               best_loss=(best.metrics or {}).get("loss"),
               checkpoint=best.checkpoint.path if best.checkpoint else None, path=best.path)
    return out


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, tuple))


# Ray Tune's trainable registry is not thread-safe: two Tuners of one driver (tenants run in
# threads) registering at once fail in Ray's flush ("dictionary changed size during iteration").
_REGISTRY_LOCK = threading.Lock()


def registered_trainable(task: LoRATask) -> str:
    """Register the task's trainable (named per task by `lora_trainable`) under a lock and return
    its name: a Tuner given the name does not register again, so tenants never race there."""
    from ray import tune

    from alto_ray.tune.trainable import lora_trainable

    cls = lora_trainable(task)
    with _REGISTRY_LOCK:
        tune.register_trainable(cls.__name__, cls)
    return cls.__name__


def run_tenant(task: LoRATask, param_space: dict, tune_config: Any, run_config: Any = None, *,
               on_tenant: Optional[Callable[[Tenant], None]] = None, **tenant_kwargs: Any) -> Any:
    """register → (queue) → fit → finished: one tenant's whole Tune run; returns the ResultGrid.

    `on_tenant` sees the `Tenant` before it registers (to watch its queue position, grants)."""
    from ray import tune

    tenant = Tenant(task, count_trials(param_space, tune_config.num_samples), param_space=param_space,
                    **tenant_kwargs)
    if on_tenant is not None:
        on_tenant(tenant)
    with tenant:
        tuner = tune.Tuner(registered_trainable(tenant.task), param_space=param_space,
                           tune_config=tune_config, run_config=run_config)
        grid = tuner.fit()
        tenant.finish(summarize(grid, tune_config.metric or "loss", tune_config.mode or "min"))
    return grid
