"""Tenant liveness: a task whose tenant's driver died is abandoned instead of kept forever.

A tenant registers its task with the Ray job id of its driver (`driver_job_id`). A driver that
dies without `task_finished` / `withdraw` (kill -9, `ray job stop`, its node died, a Ctrl-C that
skipped the cleanup) would otherwise keep its detached placement groups (a running task: GPUs
leaked) or its place in the plan (a queued one: every later tenant delayed). Ray's GCS marks a
driver's job dead as soon as the driver's connection drops, so the coordinator reads the job
table (`dead_jobs`) at most every `liveness_check_s`, before each re-plan, when it (re)starts
with tasks in its state file, and on its own timer (`start_ticker`: an idle coordinator frees the
groups too). A task whose job is dead is abandoned: its placement groups are removed, it leaves
the plan (the next tenant is granted), the placement its tenant published for its trials (Ray's
KV store, the grant key it registered with) is dropped, and an `Abandonment` is recorded (state file, `metrics()`,
`describe()`, `status()`); finished results are never touched. A task registered without a job
id (an older tenant, an older state file) is never abandoned, nor is any task while the job
table cannot be read (or does not answer within `gcs.READ_TIMEOUT_S`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional

import ray

from alto_ray.cluster.gcs import JOBS, bounded_read

logger = logging.getLogger(__name__)

DEFAULT_CHECK_S = 10.0
MAX_EVENTS = 50                  # a crash-looping tenant must not grow the state file without bound
ABANDONED = "abandoned"          # status() of a task given up because its driver's job died


@dataclass(frozen=True)
class Abandonment:
    """One task given up because the Ray job of the driver that registered it died."""

    task_id: str
    job_id: str
    status: str                  # what the task was: queued | running
    pg_names: tuple[str, ...]    # the placement groups removed (none for a queued task)
    at: float                    # when the coordinator noticed
    job_ended_at: Optional[float] = None   # when Ray marked the job dead, if it says
    on_restart: bool = False     # noticed as the coordinator restarted with the task in its state file

    def describe(self) -> str:
        def clock(t: float) -> str:
            return time.strftime("%H:%M:%S", time.localtime(t))

        ended = f" at {clock(self.job_ended_at)}" if self.job_ended_at else ""
        when = f"as the coordinator restarted at {clock(self.at)}" if self.on_restart else f"at {clock(self.at)}"
        freed = f"freed {', '.join(self.pg_names)}" if self.pg_names else "left the queue"
        return f"driver job {self.job_id} died{ended}; abandoned {when} while {self.status}: {freed}"


class LivenessWatch:
    """When to read the job table, and the tasks abandoned so far (the latest `MAX_EVENTS`)."""

    def __init__(self, check_s: Optional[float] = DEFAULT_CHECK_S) -> None:
        self.check_s = check_s           # None: liveness off (no task is ever abandoned)
        self.events: list[Abandonment] = []
        self.checks = 0                  # job-table reads so far (tests, metrics)
        self.checked_at = 0.0
        self.readable = True             # the last read of the job table worked

    def sweep(self, tasks: Mapping[str, Any], give_up: Callable[[str], None], force: bool = False,
              on_restart: bool = False) -> list[Abandonment]:
        """Abandon the tasks (name -> the coordinator's entry: `job_id`, `status`, `groups`)
        whose driver's job is dead: record each, then `give_up(name)` frees its groups and drops
        it. The job table is read only when a task has a job id, and at most every `check_s`
        unless `force`."""
        jobs = {t: e.job_id for t, e in tasks.items() if getattr(e, "job_id", None)}
        if self.check_s is None or not jobs or (not force and time.time() - self.checked_at < self.check_s):
            return []
        self.checked_at, self.checks = time.time(), self.checks + 1
        ended = dead_jobs(set(jobs.values()))
        if (ended is None) == self.readable:     # log the change only, not every check
            log = logger.warning if ended is None else logger.info
            log("alto coordinator: Ray's job table is %s", "unreadable: tenants count as alive until it is back"
                if ended is None else "readable again: tenant liveness checked")
        self.readable = ended is not None
        out = []
        for name, job in jobs.items():
            if job in (ended or {}):
                entry = tasks[name]
                event = Abandonment(name, job, entry.status, tuple(sorted(g.pg_name for g in entry.groups.values())),
                                    time.time(), ended[job], on_restart)
                logger.warning("alto coordinator: task %s: %s", name, event.describe())
                self.events = (self.events + [event])[-MAX_EVENTS:]
                give_up(name)
                out.append(event)
        return out

    def statuses(self) -> dict[str, str]:
        """Task -> `ABANDONED` for each abandoned task (a task registered again since overrides it)."""
        return {x.task_id: ABANDONED for x in self.events}

    def metrics(self) -> dict[str, Any]:
        return {"check_s": self.check_s, "checks": self.checks, "checked_at": self.checked_at or None,
                "job_table_readable": self.readable}

    def to_json(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(x) for x in self.events]

    def load(self, data: list[dict[str, Any]]) -> None:
        self.events = [Abandonment(**{**x, "pg_names": tuple(x["pg_names"])}) for x in data][-MAX_EVENTS:]

    def describe(self) -> str:
        lines = [f"  {x.task_id}: {x.describe()}" for x in self.events]
        return "\nabandoned (tenant's driver died):\n" + "\n".join(lines) if lines else ""


def driver_job_id() -> Optional[str]:
    """The Ray job id (hex) of this process's driver: a tenant's identity for liveness; None
    when Ray cannot tell (its task is then never abandoned)."""
    try:
        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - registering without liveness beats not registering
        return None


def register_with_job_id(register: Callable[..., str], tenant: str, requeue: bool = False,
                         grant_key: Optional[str] = None) -> str:
    """`register(requeue=..., job_id=..., grant_key=...)`: a coordinator call registering the
    tenant's task with its driver's job id and the key of the placement it publishes (dropped by
    the coordinator if the driver dies). The coordinator is detached and outlives upgrades: one
    started by an older alto-ray takes no grant key, or no job id either (Ray checks a call
    against the running actor's signature: TypeError), and the task then registers with what it
    takes (no liveness, or a dead tenant's grant left in Ray's KV store, until it restarts)."""
    job_id = driver_job_id()
    extra = {} if job_id is None else {"job_id": job_id, **({"grant_key": grant_key} if grant_key else {})}
    while extra:
        try:
            return register(requeue=requeue, **extra)
        except TypeError as err:
            dropped, _ = extra.popitem()         # the newest argument first
            logger.warning("alto tenant %s: the coordinator runs an older alto-ray (%s); registering without "
                           "its %s (restart the coordinator to use it)", tenant, err, dropped)
    return register(requeue=requeue)


def dead_jobs(job_ids: Collection[str]) -> Optional[dict[str, Optional[float]]]:
    """Those of `job_ids` that Ray's job table lists dead -> when they ended (s since the epoch,
    None if Ray does not say); None when the table cannot be read, or not in time
    (`gcs.bounded_read`: the caller counts every tenant alive then). A job the table does not
    list counts as alive: only Ray saying it died abandons a task.

    Ray (2.60) has no public read of the job table that works without the dashboard:
    `ray.util.state.list_jobs` and `JobSubmissionClient` both go through it. This reads the GCS
    job table through `ray._private.state.jobs()`, the private sibling of the public
    `ray.nodes()` (the same GCS accessor, present since Ray 1.x); it is the one private Ray call
    of liveness, so replace it here if Ray moves it.
    """
    try:
        from ray._private import state

        table = bounded_read(JOBS, state.jobs)
    except Exception as err:  # noqa: BLE001 - GCS unreachable or slow, Ray changed: nobody is abandoned
        logger.debug("reading Ray's job table: %s", err)
        return None
    wanted = set(job_ids)
    return {j["JobID"]: (j["EndTime"] / 1000.0 if j.get("EndTime") else None)
            for j in table if j.get("IsDead") and j.get("JobID") in wanted}


def start_ticker(period_s: Optional[float]) -> None:
    """Inside the coordinator actor: call its own `check_liveness(force=True)` every `period_s`
    from a thread, so a dead tenant's groups are freed within `period_s` even when no tenant
    calls (forced: a check another call made just before must not push this one a period
    later). The call goes through the actor's queue, so it never runs beside another call.
    Outside an actor (the class used directly, tests) or with liveness off: nothing."""
    if not period_s or period_s <= 0 or not ray.is_initialized():
        return
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None:
        return
    me = ctx.current_actor
    if not hasattr(me, "check_liveness"):
        return

    def tick() -> None:
        while True:
            time.sleep(period_s)
            try:
                ray.get(me.check_liveness.remote(force=True))
            except ray.exceptions.RayActorError:
                return                           # the coordinator is going away
            except Exception as err:  # noqa: BLE001 - a missed tick is retried on the next
                logger.debug("liveness tick: %s", err)

    threading.Thread(target=tick, name="alto-liveness", daemon=True).start()
