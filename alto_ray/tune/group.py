"""`AdapterGroup`: the Ray actor that holds one backbone and trains many trials' adapters.

One group per GPU of a task (or per N GPUs, when `LoRATask.gpus_per_group=N` makes its trainer
a rank-local group). Trials join, fetch their results and leave:

* `join(trial_id, config, files)` queues the adapter; admission follows FIFO order while the
  engine's memory estimate fits the device (or `max_adapters_per_group` on CPU).
* The group runs grouped engine steps on its own and buffers each adapter's results. It trains
  ahead of what a trial has fetched by at most `LoRATask.run_ahead` steps (one bounded buffer
  per trial), so the round trip of a result through the Tune driver overlaps the next steps
  instead of stalling every adapter of the group; `run_ahead=0` is strict lock-step (a step
  runs only when every admitted adapter has asked for it).
* `next_results(trial_id, n)` returns the trial's next `n` results (fewer when it finishes),
  waiting for them if they are not trained yet.
* `get_state(trial_id)` packs the adapter as trained so far plus its results not fetched yet
  (`checkpoint.PENDING_FILE`): a restored trial reports those first, so nothing is redone and
  no report is skipped.
* `leave(trial_id, reason)` removes the adapter and admits the next queued trial at once.

The actor is async: waiting requests cost nothing, and joins, leaves and checkpoint reads are
served while the (blocking) engine step runs on the group's single worker thread. The group is
detached (it must outlive the trial that happened to create it) and exits on its own after
`idle_timeout_s` without members. A trial that vanished without leaving is noticed through
its actor handle (dead → evicted at once) or, as a backstop, after `lease_timeout_s` of silence.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

import ray

from alto_ray.tune.admission import allocated_bytes, capped, memory_budget, oom_cap, record_oom
from alto_ray.tune.checkpoint import Files, files_of, pending_results, snapshot_state, unpack_state, with_pending
from alto_ray.tune.group_setup import adapter_config, make_trainer, resolve_device, torch_dtype
from alto_ray.tune.metrics import GroupMetrics
from alto_ray.tune.task import GroupSpec, LoRATask

logger = logging.getLogger(__name__)

NAMESPACE = "alto"
_PING_AFTER_S = 2.0  # a silent trial's actor is checked for liveness after this long
_TICK_S = 0.5


class GroupClosing(RuntimeError):
    """The group is shutting down (idle); the caller should get or create it again."""


class _State(enum.Enum):
    QUEUED = "queued"
    ACTIVE = "active"
    FINISHED = "finished"  # reached max_steps / gave up on non-finite loss; adapter removed
    EVICTED = "evicted"


@dataclass
class _Member:
    trial_id: str
    config: Any  # engine AdapterConfig
    joined_at: float
    files: Optional[Files] = None  # restore state, until admitted; final snapshot once finished
    owner: Any = None  # the trial's actor handle (liveness checks)
    state: _State = _State.QUEUED
    pending: Optional[asyncio.Future] = None  # a waiting next_results request ...
    want: int = 0  # ... for this many results
    buffer: Deque[Dict[str, Any]] = field(default_factory=deque)  # trained, not fetched yet
    last_seen: float = 0.0
    queue_wait_s: float = 0.0
    tokens: int = 0
    eval_loss: Optional[float] = None
    eval_step: int = 0
    nonfinite: int = 0
    step: int = 0
    ping: Any = None
    error: Optional[BaseException] = None  # an engine failure not reported to the trial yet
    reason: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def meta(self) -> Dict[str, Any]:
        return {"tokens": self.tokens, "eval_loss": self.eval_loss, "eval_step": self.eval_step,
                "step": self.step, "trial_id": self.trial_id, **self.extra}


@ray.remote(max_restarts=0)
class AdapterGroup:
    """One backbone on one device, shared by the adapters of many trials of one task."""

    def __init__(self, task: LoRATask, spec: GroupSpec) -> None:
        import torch  # heavy imports: only in the group process, never in trials

        self.task = task
        self.spec = spec
        self.task_name = task.task_name
        # With a trainer factory the devices are its workers'; this process has one only if asked.
        self.device = resolve_device("auto" if spec.trainer else task.device)
        torch.set_num_threads(max(1, int(spec.resources.get("CPU", 1) or 1)))
        self.gpu = ",".join(str(g) for g in ray.get_gpu_ids()) if self.device == "cuda" else ""
        self.trainer = make_trainer(task, spec, self.device, torch_dtype(task.dtype))
        self.memory = memory_budget(self.trainer, self.device, task.memory_headroom,
                                    capped(task.max_adapters_per_group, oom_cap(self.task_name)))
        self._members: Dict[str, _Member] = {}
        self._reserved: Dict[str, float] = {}  # trial id -> when; checked, not joined yet
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alto-engine")
        self._lock: Optional[asyncio.Lock] = None
        self._wake: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._idle_since = time.monotonic()
        self._closing = False
        self._steps = 0
        self._last_step_end = time.monotonic()
        self.metrics = GroupMetrics(self.task_name, spec.name.rsplit(":", 1)[-1])

    def __repr__(self) -> str:  # the name the Ray dashboard shows: task, group, device
        spec, device = getattr(self, "spec", None), getattr(self, "device", None)
        if spec is None:  # the actor class itself
            return "AdapterGroup"
        return f"AdapterGroup({self.task_name}, {spec.name.rsplit(':', 1)[-1]}, {self._where()})"

    def _where(self) -> str:
        """The group's devices: its GPU, or a rank-local group's ranks (each on its own device)."""
        ranks = getattr(getattr(self, "trainer", None), "rank_info", None)
        if ranks:
            return f"{len(ranks)} ranks: " + " ".join(str(r.get("device", "?")) for r in ranks)
        return f"cuda:{self.gpu}" if self.device == "cuda" else "cpu"

    # ------------------------------------------------------------------ trial API
    def check(self, config: Dict[str, Any], reserve_for: Optional[str] = None) -> Optional[str]:
        """Why `config` is not a valid adapter config (None when it is); a valid one reserves.

        Validation runs here so that trial processes never import torch: with dozens of trials
        per GPU, their start-up cost is otherwise dominated by importing it. The reservation
        counts in `load()` until the trial joins, so trials starting together spread evenly.
        """
        try:
            adapter_config(config)
        except ValueError as err:
            return str(err)
        if reserve_for is not None:
            self._reserved[reserve_for] = time.monotonic()
        return None

    async def join(self, trial_id: str, config: Dict[str, Any], files: Optional[Files] = None,
                   owner: Any = None) -> Dict[str, Any]:
        """Queue a trial's adapter (with its checkpoint `files` when resuming)."""
        self._ensure_loop()
        if self._closing:
            raise GroupClosing(f"{self.spec.name} is shutting down")
        config = adapter_config(config)
        self._reserved.pop(trial_id, None)
        if trial_id in self._members:  # a restarted trial whose old self never left
            await self._drop(trial_id, "rejoined")
        now = time.monotonic()
        member = _Member(trial_id, config, now, files=files, owner=owner, last_seen=now)
        member.buffer.extend(pending_results(files))  # reported first, even while queued
        self._members[trial_id] = member
        await self._admit()
        self._wake.set()
        return {"group": self.spec.name, "device": self.device,
                "state": self._members[trial_id].state.value, **self._load()}

    async def next_results(self, trial_id: str, n: int = 1) -> List[Dict[str, Any]]:
        """The trial's next `n` results (fewer if it finishes first), oldest first."""
        self._ensure_loop()
        m = self._members.get(trial_id)
        if m is None or m.state is _State.EVICTED:
            why = m.reason if m else "not a member"
            raise LookupError(f"trial {trial_id} is not in {self.spec.name} ({why}); rejoin")
        if m.state is _State.FINISHED and not m.buffer:
            raise RuntimeError(f"trial {trial_id} already finished ({m.reason})")
        if m.pending is not None and not m.pending.done():
            raise RuntimeError(f"trial {trial_id} already has a request in flight")
        m.pending = asyncio.get_running_loop().create_future()
        m.want = max(1, int(n))
        m.last_seen = time.monotonic()
        m.ping = None
        fut = m.pending
        self._deliver(m)
        self._wake.set()
        return await fut

    async def next_result(self, trial_id: str) -> Dict[str, Any]:
        """The trial's next result (`next_results` with n=1)."""
        return (await self.next_results(trial_id, 1))[0]

    async def leave(self, trial_id: str, reason: str = "stopped") -> bool:
        """Remove the trial's adapter; the next queued trial is admitted right away."""
        self._ensure_loop()
        self._reserved.pop(trial_id, None)
        found = await self._drop(trial_id, reason)
        await self._admit()
        self._wake.set()
        return found

    async def get_state(self, trial_id: str) -> Files:
        """The trial's checkpoint as `{file name: bytes}`: its adapter as trained so far plus
        the results it has not fetched yet (which a restore reports first)."""
        self._ensure_loop()
        m = self._members.get(trial_id)
        if m is None or m.state is _State.EVICTED:
            raise LookupError(f"trial {trial_id} is not in {self.spec.name}")
        m.last_seen = time.monotonic()
        async with self._lock:  # the group may be training ahead: copy state between steps
            if self._members.get(trial_id) is not m or m.state is _State.EVICTED:
                raise LookupError(f"trial {trial_id} left {self.spec.name}")
            if m.state is _State.ACTIVE:
                snap = await self._run(snapshot_state, self.trainer, trial_id, self._summary(m))
            elif m.files is None:
                raise RuntimeError(f"trial {trial_id} has no state yet (still queued)")
            else:
                snap = m.files
            pending = list(m.buffer)
        # Serialising (~1 s for a rank-64 adapter of a 1B model with its optimizer state) runs
        # off the engine thread and outside the lock: the other adapters keep training.
        files = await asyncio.get_running_loop().run_in_executor(None, files_of, snap)
        if m.files is snap:
            m.files = files  # a finished member's snapshot is serialised once
        return with_pending(files, pending)

    async def load(self) -> Dict[str, Any]:
        """Members by state; trials pick the least-loaded group by `active + queued + reserved`.

        Every trial calls this first (see `connect`), so it also starts the step loop, which
        is what lets an unused group exit after `idle_timeout_s`.
        """
        self._ensure_loop()
        return self._load()

    def _load(self) -> Dict[str, Any]:
        counts = {s.value: 0 for s in _State}
        for m in self._members.values():
            counts[m.state.value] += 1
        horizon = time.monotonic() - self.task.lease_timeout_s
        self._reserved = {t: at for t, at in self._reserved.items() if at > horizon}
        return {"active": counts["active"], "queued": counts["queued"], "reserved": len(self._reserved),
                "finished": counts["finished"], "closing": self._closing}

    def describe(self) -> Dict[str, Any]:
        return {"group": self.spec.name, "task": self.task_name, "device": self.device,
                "gpu": self.gpu, "where": self._where(), "steps": self._steps, "members": {
                    t: {"state": m.state.value, "step": m.step, "reason": m.reason}
                    for t, m in self._members.items()}, **self._load()}

    # ------------------------------------------------------------------ internals
    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._lock = asyncio.Lock()
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _run(self, fn: Callable, *args: Any) -> Any:
        """Run blocking engine work on the group's one engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _loop(self) -> None:
        """Step while every adapter has room, else sleep until a request, join or leave wakes us.

        The event is cleared *before* the state is examined: a wake-up that arrives while a step
        or the checks run then keeps the event set, so the next wait returns at once. (Clearing
        it after the wait, as this loop once did, lost wake-ups that raced the wait's return;
        each loss cost a full `_TICK_S`, which on an H100 was most of a step.)
        """
        while True:
            self._wake.clear()
            try:
                await self._check_liveness()
                if await self._step():
                    continue  # more may be due right away (run-ahead)
                if self._idle_exit_due():
                    self._closing = True
                    ray.get_runtime_context().current_actor.__ray_terminate__.remote()
                    return
            except Exception:  # keep serving; the failing trial gets the error
                logger.exception("%s: step loop error", self.spec.name)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=_TICK_S)
            except asyncio.TimeoutError:
                pass

    async def _step(self) -> bool:
        """One grouped step if every admitted adapter has room in its result buffer."""
        t0 = time.monotonic()
        step_tokens = 0
        async with self._lock:  # membership cannot change from here to the buffered results
            active = [m for m in self._members.values() if m.state is _State.ACTIVE]
            if not active or not all(self._has_room(m) for m in active):
                return False
            t_locked = time.monotonic()
            try:
                results = await self._run(self.trainer.step)
            except Exception as err:  # an engine failure fails this step's adapters only
                if "out of memory" in str(err).lower():  # the estimate was too low: learn
                    self.memory.on_oom()
                    record_oom(self.task_name, len(active))  # and so do later groups of the task
                for m in active:
                    _fail(m, err)
                self._exit_if_broken()
                raise
            self._steps += 1
            t_stepped = time.monotonic()
            idle = t0 - self._last_step_end
            due = [m.trial_id for m in active
                   if m.trial_id in results and self._eval_due(m, results[m.trial_id].step)]
            try:
                evals = await self._run(self.trainer.evaluate, due) if due else {}
            except Exception as err:  # the step itself counted; only this step's results fail
                for m in active:     # (retrying the same evaluation would spin on the same error)
                    _fail(m, err)
                self._exit_if_broken()
                raise
            t_done = time.monotonic()
            seconds = t_done - t0
            for m in active:
                r = results.get(m.trial_id)
                if r is None or self._members.get(m.trial_id) is not m:
                    continue  # left while the step ran
                step_tokens += int(r.tokens)
                result = self._result(m, r, evals.get(m.trial_id), seconds)
                result.update(group_idle_s=idle, group_lock_wait_s=t_locked - t0,
                              group_engine_s=t_stepped - t_locked, group_eval_s=t_done - t_stepped)
                reason = result.pop("_reason")
                m.buffer.append(result)
                if reason:  # snapshot for the final checkpoint, then free the slot at once
                    m.files = await self._run(snapshot_state, self.trainer, m.trial_id, self._summary(m))
                    await self._run(self.trainer.remove_adapter, m.trial_id)
                    m.state, m.reason = _State.FINISHED, reason
                    self.metrics.on_exit(reason)
        self._last_step_end = time.monotonic()
        for m in active:
            self._deliver(m)
        if any(m.state is _State.FINISHED for m in active):
            await self._admit()
        self.memory.after_step()
        load = self._load()
        self.metrics.on_step(load["active"], load["queued"], step_tokens, seconds, allocated_bytes(self.device),
                             idle_seconds=idle)
        return True

    def _exit_if_broken(self) -> None:
        """A trainer that cannot step again (a rank-local group that lost a rank) ends the group:
        its trials see it gone and resume from their checkpoints on a new one (`connect`)."""
        broken = getattr(self.trainer, "broken", None)
        if broken and not self._closing:
            logger.error("%s: %s; the group exits", self.spec.name, broken)
            self._closing = True
            ray.get_runtime_context().current_actor.__ray_terminate__.remote()

    def _has_room(self, m: _Member) -> bool:
        """May the group train `m` once more? Up to `run_ahead` results past what was fetched,
        and always as many as a waiting request asks for (run_ahead=0: only those)."""
        asked = m.want if m.pending is not None and not m.pending.done() else 0
        return len(m.buffer) < max(self.task.run_ahead_steps, asked)

    def _deliver(self, m: _Member) -> None:
        """Answer `m`'s waiting request if its buffer holds enough (or its last) results."""
        if m.pending is None or m.pending.done():
            return
        if m.error is not None:
            err, m.error = m.error, None
            _fail(m, err)
            return
        if not m.buffer:
            return
        last = next((i + 1 for i, r in enumerate(m.buffer) if r["done"]), None)
        if len(m.buffer) < m.want and last is None and m.state is not _State.FINISHED:
            return
        n = min(m.want, last or m.want, len(m.buffer))
        out = [m.buffer.popleft() for _ in range(n)]
        m.pending.set_result(out)
        m.pending, m.last_seen = None, time.monotonic()

    def _eval_due(self, m: _Member, step: int) -> bool:
        return (m.eval_loss is None or step % self.task.eval_every == 0
                or step >= self._max_steps(m))

    def _max_steps(self, m: _Member) -> int:
        return int(getattr(m.config, "max_steps", self.task.max_steps) or self.task.max_steps)

    def _result(self, m: _Member, r: Any, eval_loss: Optional[float], seconds: float) -> Dict[str, Any]:
        finite = bool(getattr(r, "finite", True)) and math.isfinite(float(r.loss))
        m.step = int(r.step)
        m.tokens += int(r.tokens)
        m.nonfinite = 0 if finite else m.nonfinite + 1
        if eval_loss is not None:
            m.eval_loss, m.eval_step = float(eval_loss), m.step
        max_steps = self._max_steps(m)
        reason = ""
        if m.step >= max_steps:
            reason = "done"
        elif m.nonfinite >= self.task.nonfinite_patience:
            reason = "nonfinite"
        load = self._load()
        return {
            "loss": float(r.loss) if finite else float("nan"),
            "eval_loss": m.eval_loss if m.eval_loss is not None else float("nan"),
            "eval_step": m.eval_step, "tokens": m.tokens, "lr": float(r.lr),
            "grad_norm": float(getattr(r, "grad_norm", float("nan"))), "finite": finite,
            "step": m.step, "max_steps": max_steps, "done": bool(reason), "_reason": reason,
            "alto_task": self.task_name, "alto_group": self.spec.name,
            "alto_active": load["active"], "alto_queued": load["queued"],
            "queue_wait_s": m.queue_wait_s, "group_step_s": seconds,
            "alto_graph_replays": (getattr(self.trainer, "graph_stats", None) or {}).get("replays", 0),
        }

    def _summary(self, m: _Member) -> Dict[str, Any]:
        return {**m.meta(), "task": self.task_name, "group": self.spec.name,
                "config": m.config.to_dict()}

    async def _drop(self, trial_id: str, reason: str) -> bool:
        m = self._members.pop(trial_id, None)
        if m is None:
            return False
        if m.pending is not None and not m.pending.done():
            _fail(m, LookupError(f"trial {trial_id} left {self.spec.name} ({reason})"))
        if m.state is _State.ACTIVE:
            async with self._lock:
                await self._remove_adapter(trial_id)
        if m.state is not _State.FINISHED:
            self.metrics.on_exit(reason)
        if not self._members:
            self._idle_since = time.monotonic()
        return True

    async def _evict(self, m: _Member, reason: str) -> None:
        """Remove a vanished trial's adapter but keep a tombstone so a late request learns why."""
        if m.state is _State.ACTIVE:
            async with self._lock:
                await self._remove_adapter(m.trial_id)
        m.state, m.reason, m.files = _State.EVICTED, reason, None
        self.metrics.on_exit("evicted")
        logger.warning("%s: evicted trial %s (%s)", self.spec.name, m.trial_id, reason)
        await self._admit()

    async def _remove_adapter(self, trial_id: str) -> None:
        if trial_id in self.trainer.adapter_names:  # may have finished while we waited
            await self._run(self.trainer.remove_adapter, trial_id)

    async def _admit(self) -> None:
        """Admit queued trials in FIFO order while capacity allows."""
        async with self._lock:
            for m in sorted((m for m in self._members.values() if m.state is _State.QUEUED),
                            key=lambda m: m.joined_at):
                if m.buffer and m.buffer[-1]["done"]:  # restored after its last step: nothing to train
                    m.state, m.reason = _State.FINISHED, "done"
                    continue
                active = [x.trial_id for x in self._members.values() if x.state is _State.ACTIVE]
                if not self.memory.admit(m.trial_id, m.config, active):
                    break
                try:
                    state, meta = unpack_state(m.files)
                    await self._run(self.trainer.add_adapter, m.trial_id, m.config, state)
                except Exception as err:  # bad checkpoint / OOM: fail that trial only
                    self._members.pop(m.trial_id, None)
                    _fail(m, err)
                    self.metrics.on_exit("error")
                    continue
                now = time.monotonic()
                m.state, m.files, m.queue_wait_s, m.last_seen = _State.ACTIVE, None, now - m.joined_at, now
                m.tokens = int(meta.get("tokens", 0))
                m.eval_loss = meta.get("eval_loss")
                m.eval_step = int(meta.get("eval_step", 0))
                m.step = int(meta.get("step", 0))
        load = self._load()
        self.metrics.on_membership(load["active"], load["queued"])

    async def _check_liveness(self) -> None:
        """Evict active members whose trial actor died or went silent past the lease."""
        now = time.monotonic()
        for m in list(self._members.values()):
            if m.state is not _State.ACTIVE or m.pending is not None:
                continue
            silent = now - m.last_seen
            if silent > self.task.lease_timeout_s:
                await self._evict(m, f"no request for {silent:.0f}s (lease)")
                continue
            if m.owner is None or silent < _PING_AFTER_S:
                continue
            if m.ping is None:
                m.ping = m.owner.__ray_ready__.remote()
                continue
            ready, _ = ray.wait([m.ping], timeout=0)
            if ready:
                try:
                    ray.get(m.ping)
                    m.ping = None  # alive but busy (e.g. writing a checkpoint)
                    m.last_seen = max(m.last_seen, now - _PING_AFTER_S)
                except ray.exceptions.RayActorError:
                    await self._evict(m, "trial actor died")

    def _idle_exit_due(self) -> bool:
        if self._members or self._load()["reserved"]:
            return False
        return time.monotonic() - self._idle_since > self.task.idle_timeout_s


# ---------------------------------------------------------------------- helpers
def _fail(m: _Member, err: BaseException) -> None:
    """Fail `m`'s waiting request, or keep the error for its next one."""
    if m.pending is not None and not m.pending.done():
        m.pending.set_exception(err)
    else:
        m.error = err
    m.pending = None
