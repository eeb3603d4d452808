"""`LoRATask`: what is being tuned (model, data, schedule) and how its groups are run.

A task is the unit that shares a backbone: every trial of one task trains an adapter on the
same frozen model and dataset, so trials of one task can join one `AdapterGroup`. The task is
validated on the driver, in `lora_trainable(task)`, before Tune starts any actor or takes a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from alto_ray.tune.capacity import alive_nodes, gpus_possible, launchable_node_types

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DTYPES = (None, "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
_DEVICES = ("auto", "cpu", "cuda")
# The trainer factory of a group spanning several GPUs. A string, resolved inside the group
# process: this layer never imports the cluster layer.
RANK_LOCAL_TRAINER = "alto_ray.cluster.ranklocal_ray:rank_local_trainer"
CPU_RANK_CPUS = 0.5  # CPU-only cluster: a rank takes half a CPU, leaving room for trials
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class GroupSpec:
    """Where one `AdapterGroup` of a task lives.

    This is the seam for the cluster coordinator: a `placement` callable returns the list of
    `GroupSpec`s for a task; the trial joins the least-loaded live one. `options` are passed
    to `AdapterGroup.options(...)` as they are (e.g. `scheduling_strategy` with a placement
    group and bundle index); `resources` are the actor's resources.

    `trainer` names a trainer factory ("module:function", imported in the group process) called
    as `factory(task, spec, dataset=..., dtype=..., **trainer_kwargs)`; it returns an object with
    `GroupedTrainer`'s API that the group drives instead of building a `GroupedTrainer` on its own
    device. `RANK_LOCAL_TRAINER` is the one for groups spanning several GPUs: its rank workers
    hold the GPUs (`trainer_kwargs`: `num_ranks`, `use_gpu`, `cpus_per_rank`, and optionally
    `placement_group` + `bundle_indices`), the group's own process needs no device.
    """

    name: str  # Ray actor name, unique within the "alto" namespace
    index: int  # position of the group within its task (dashboard, metric tags)
    resources: Dict[str, float]  # {"CPU": 1, "GPU": 1} style
    options: Dict[str, Any] = field(default_factory=dict)
    trainer: Optional[str] = None  # "module:function" trainer factory; None: a GroupedTrainer
    trainer_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trainer is not None and not _FACTORY.match(self.trainer):
            raise ValueError(f"GroupSpec.trainer: expected 'module:function', got {self.trainer!r}")

    def trainer_factory(self) -> Optional[Callable[..., Any]]:
        """`trainer` imported (in the group process); None for the default `GroupedTrainer`."""
        if self.trainer is None:
            return None
        import importlib

        module, _, func = self.trainer.partition(":")
        return getattr(importlib.import_module(module), func)


PlacementFn = Callable[["LoRATask"], List[GroupSpec]]


@dataclass
class LoRATask:
    """A LoRA tuning task: one backbone + one dataset, shared by all trials that tune it.

    Trial configs (the Tune `param_space`) carry the per-adapter hyperparameters (`rank`,
    `alpha`, `lr`, `batch_size`, `dropout`, ...: any `AdapterConfig` field); `adapter_defaults`
    fills the fields a sweep does not search over.
    """

    model: Union[str, Callable[[], Any]]  # local path / hub id, or a zero-arg nn.Module factory
    dataset: Any  # a .jsonl/.json path or an engine `DatasetSpec`
    max_steps: int = 300
    eval_every: int = 25
    checkpoint_every: Optional[int] = None  # engine steps; default: eval_every
    steps_per_report: int = 1  # engine steps per Tune result
    run_ahead: Optional[int] = None  # steps a group may train past a trial's last request; None → 2 × steps_per_report
    name: Optional[str] = None  # default: derived from model + dataset + settings
    target_modules: Optional[Sequence[str]] = None  # default: engine DEFAULT_TARGET_MODULES
    device: str = "auto"  # "auto" → cuda when the group actor sees a GPU, else cpu
    dtype: Optional[str] = None  # backbone dtype; None → engine default
    eval_size: int = 64  # held-out examples used for eval_loss
    max_seq_len: Optional[int] = None  # AdapterConfig defaults for every trial (a config key wins)
    warmup_steps: Optional[int] = None
    adapter_defaults: Dict[str, Any] = field(default_factory=dict)  # any other AdapterConfig field
    max_adapters_per_group: Optional[int] = None  # None → bounded by memory only
    num_groups: Optional[int] = None  # None → number of GPUs Ray sees (at least 1)
    group_resources: Optional[Dict[str, float]] = None  # None → {"CPU": 1} (+ {"GPU": 1})
    # > 1: each group is a rank-local group over this many GPUs of one node (backbone sharded,
    # each adapter on one rank); `group_resources` are then each rank's. On CPU: gloo ranks.
    gpus_per_group: int = 1
    placement: Optional[PlacementFn] = None  # None → `local_placement`
    lease_timeout_s: float = 300.0  # evict an adapter whose trial went silent this long
    idle_timeout_s: float = 60.0  # a group with no members exits after this long
    nonfinite_patience: int = 3  # consecutive non-finite steps before the trial ends itself
    memory_headroom: float = 0.1  # fraction of free device memory admission leaves unused
    # Replay each group step whose batch shape repeats as a CUDA graph (engine `cuda_graphs`):
    # 1.8x the tokens/s of a Llama-1B-shape group step, 1.01-1.13x at 8B (BENCHMARKS.md). None → the
    # ALTO_CUDA_GRAPHS environment variable of the group actor, off by default. Single-GPU groups.
    cuda_graphs: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, tuple):
            self.target_modules = tuple(self.target_modules)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "LoRATask":
        """Raise ValueError naming the offending field; cheap, touches no actor or GPU."""
        if isinstance(self.model, str):
            if not self.model:
                raise ValueError("LoRATask.model: empty model path / hub id")
            looks_local = (
                self.model.startswith(("/", "./", "../", "~"))
                or self.model.count("/") > 1
                or not _HUB_ID.match(self.model)
            )
            path = os.path.expanduser(self.model)
            if not os.path.exists(path) and looks_local:
                raise ValueError(f"LoRATask.model: path {self.model!r} does not exist")
            if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"LoRATask.model: {self.model!r} has no config.json (not a model directory)")
        elif not callable(self.model):
            raise ValueError("LoRATask.model: expected a path, a hub id or a model factory")
        if isinstance(self.dataset, (str, os.PathLike)):
            _check_dataset_file(os.path.expanduser(os.fspath(self.dataset)))
        elif self.dataset is None:
            raise ValueError("LoRATask.dataset: required (a .jsonl path or a DatasetSpec)")
        for name in ("max_steps", "eval_every", "steps_per_report", "eval_size",
                     "nonfinite_patience", "gpus_per_group"):
            _positive_int(self, name)
        for name in ("checkpoint_every", "max_adapters_per_group", "num_groups", "max_seq_len"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if self.run_ahead is not None and (not isinstance(self.run_ahead, int) or self.run_ahead < 0):
            raise ValueError(f"LoRATask.run_ahead: must be an integer >= 0, got {self.run_ahead!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"LoRATask.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("lease_timeout_s", "idle_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"LoRATask.{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.memory_headroom) < 1.0:
            raise ValueError(f"LoRATask.memory_headroom: must be in [0, 1), got {self.memory_headroom!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"LoRATask.cuda_graphs: expected True, False or None, got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.gpus_per_group > 1:
            raise ValueError("LoRATask.cuda_graphs: only for single-GPU groups; rank-local groups "
                             f"(gpus_per_group={self.gpus_per_group}) step eagerly")
        if self.device not in _DEVICES:
            raise ValueError(f"LoRATask.device: expected one of {_DEVICES}, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"LoRATask.dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.name is not None and not re.match(r"^[A-Za-z0-9._-]+$", self.name):
            raise ValueError(f"LoRATask.name: use letters, digits, '.', '_', '-' only, got {self.name!r}")
        if not isinstance(self.adapter_defaults, dict):
            raise ValueError("LoRATask.adapter_defaults: expected a dict")
        if self.group_resources is not None and not isinstance(self.group_resources, dict):
            raise ValueError("LoRATask.group_resources: expected a dict such as {'CPU': 1, 'GPU': 1}")
        if self.placement is not None and not callable(self.placement):
            raise ValueError("LoRATask.placement: expected a callable task -> list[GroupSpec]")
        if self.gpus_per_group > 1 and self.placement is None:
            rank_local_layout(self)  # ranks and resources; capacity too when Ray is connected
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def run_ahead_steps(self) -> int:
        """How many undelivered results a group may hold per trial (0: strict lock-step)."""
        return int(self.run_ahead) if self.run_ahead is not None else 2 * int(self.steps_per_report)

    @property
    def checkpoint_interval(self) -> int:
        return int(self.checkpoint_every or self.eval_every)

    @property
    def task_name(self) -> str:
        """Stable name: the same task settings give the same name (and so the same groups)."""
        if self.name:
            return self.name
        model = self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "model")
        data = os.fspath(self.dataset) if isinstance(self.dataset, (str, os.PathLike)) else "data"
        base = f"{_stem(model)}-{_stem(data)}"
        return f"{base}-{self.fingerprint()[:8]}"

    def fingerprint(self) -> str:
        """Hash of everything that must match for two trials to share a backbone group."""
        ident = {
            "model": self.model if isinstance(self.model, str) else _qualname(self.model),
            "dataset": _describe(self.dataset),
            "max_steps": self.max_steps, "eval_every": self.eval_every,
            "target_modules": list(self.target_modules or ()), "dtype": self.dtype,
            "device": self.device, "eval_size": self.eval_size,
            "max_seq_len": self.max_seq_len, "warmup_steps": self.warmup_steps,
            "adapter_defaults": {k: repr(v) for k, v in sorted(self.adapter_defaults.items())},
        }
        if self.gpus_per_group != 1:  # another kind of group: never join a 1-GPU group's name
            ident["gpus_per_group"] = self.gpus_per_group
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def adapter_dict(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """The trial's AdapterConfig fields: task defaults, then the task's schedule, then config."""
        merged: Dict[str, Any] = dict(self.adapter_defaults)
        for name in ("max_seq_len", "warmup_steps"):
            if getattr(self, name) is not None:
                merged[name] = getattr(self, name)
        merged["max_steps"] = self.max_steps
        if self.target_modules is not None:
            merged["target_modules"] = tuple(self.target_modules)
        merged.update(config)
        return merged

    def group_specs(self) -> List[GroupSpec]:
        """The groups trials of this task may join (the coordinator's seam: `placement`)."""
        return (self.placement or local_placement)(self)

    def replace(self, **changes: Any) -> "LoRATask":
        return dataclasses.replace(self, **changes)


def local_placement(task: LoRATask) -> List[GroupSpec]:
    """Default placement: one group per GPU Ray sees (one CPU group when there is none); with
    `gpus_per_group` > 1, one rank-local group per that many GPUs of one node (see
    `rank_local_layout`), each making its own STRICT_PACK placement group for its ranks."""
    if task.gpus_per_group > 1:
        n, per_rank = rank_local_layout(task)
        kwargs = {"num_ranks": task.gpus_per_group, "use_gpu": per_rank.get("GPU", 0) > 0,
                  "cpus_per_rank": per_rank.get("CPU", 0.0)}
        return [GroupSpec(name=f"alto:{task.task_name}:g{i}", index=i, resources={"CPU": 0.0},
                          trainer=RANK_LOCAL_TRAINER, trainer_kwargs=dict(kwargs)) for i in range(n)]
    gpus = _cluster_gpus()
    n = task.num_groups or max(1, gpus)
    if task.group_resources is not None:
        res = dict(task.group_resources)
    else:
        res = {"CPU": 1.0}
        # No GPU up yet but the autoscaler can start one: a GPU group whose actor waits for it
        # (it pends and asks for the node), not a CPU group.
        if task.device != "cpu" and (gpus > 0 or (_ray_connected() and gpus_possible([], launchable_node_types()))):
            res["GPU"] = 1.0
    name = task.task_name
    return [GroupSpec(name=f"alto:{name}:g{i}", index=i, resources=res) for i in range(n)]


def rank_local_layout(task: LoRATask) -> Tuple[int, Dict[str, float]]:
    """(groups, one rank's resources) of a task with `gpus_per_group` > 1 under local placement.

    A rank takes `group_resources` ({"CPU": c} plus {"GPU": 1} or none), by default one GPU and a
    CPU, or half a CPU on a cluster without GPUs (`device` "cpu" too). The ranks of one group must
    fit one node (STRICT_PACK). Raises ValueError naming the field before any actor or GPU is
    taken; with Ray not connected only the resource shape is checked (trials check it again).
    """
    nodes = alive_nodes()
    launchable = launchable_node_types() if nodes is not None else []
    if task.group_resources is not None:
        per_rank = {k: float(v) for k, v in task.group_resources.items()}
    elif task.device == "cuda" or (task.device == "auto" and gpus_possible(nodes, launchable)):
        per_rank = {"CPU": 1.0, "GPU": 1.0}
    else:
        per_rank = {"CPU": CPU_RANK_CPUS}
    if set(per_rank) - {"CPU", "GPU"} or per_rank.get("GPU", 0.0) not in (0.0, 1.0) or per_rank.get("CPU", 0.0) < 0:
        raise ValueError(f"LoRATask.group_resources: with gpus_per_group > 1 these are each rank's, "
                         f"{{'CPU': c}} plus {{'GPU': 1}} or none; got {task.group_resources!r}")
    if per_rank.get("GPU") and task.device == "cpu":
        raise ValueError("LoRATask.group_resources: a GPU per rank, but LoRATask.device is 'cpu'")
    if nodes is None:
        return task.num_groups or 1, per_rank
    ranks = task.gpus_per_group
    fits = sum(_groups_on(node, per_rank, ranks) for node in nodes)
    can_launch = any(_groups_on(t, per_rank, ranks) for t in launchable)
    if fits == 0 and not can_launch:
        big = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        largest = {k: big.get(k, 0.0) for k in ("CPU", "GPU")}
        raise ValueError(f"LoRATask.gpus_per_group: one group is {ranks} ranks of {per_rank} on one node "
                         f"(STRICT_PACK); no node of this cluster holds that (largest: {largest}), nor "
                         f"any node type its autoscaler can start ({len(launchable)} known: capacity.py)")
    n = task.num_groups or (max(fits, 1) if per_rank.get("GPU") else 1)
    if n > fits and not can_launch:  # an autoscaler can add nodes: those groups wait for them
        raise ValueError(f"LoRATask.num_groups: {n} groups of {ranks} ranks of {per_rank}; "
                         f"this cluster holds {fits} at once")
    return n, per_rank


def _groups_on(node: Dict[str, float], per_rank: Dict[str, float], ranks: int) -> int:
    """How many groups of `ranks` x `per_rank` one node holds."""
    counts = [int(node.get(k, 0.0) / (v * ranks) + 1e-9) for k, v in per_rank.items() if v > 0]
    return min(counts) if counts else 1


def _ray_connected() -> bool:
    try:
        import ray

        return bool(ray.is_initialized())
    except Exception:  # pragma: no cover
        return False


def _cluster_gpus() -> int:
    try:
        import ray

        if ray.is_initialized():
            return int(ray.cluster_resources().get("GPU", 0))
    except Exception:  # pragma: no cover - Ray not importable / not connected
        pass
    return 0


def _check_dataset_file(path: str) -> None:
    """The file exists and (for JSONL) its first record has the fields the engine will read."""
    if not os.path.isfile(path):
        raise ValueError(f"LoRATask.dataset: file {path!r} not found")
    if not path.lower().endswith(".jsonl"):
        return
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ValueError(f"LoRATask.dataset: {path!r} is empty")
    try:
        record = json.loads(first)
    except ValueError as err:
        raise ValueError(f"LoRATask.dataset: {path!r} line 1 is not JSON ({err})") from err
    if not isinstance(record, dict) or not ({"text"} <= record.keys() or {"prompt", "completion"} <= record.keys()):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"LoRATask.dataset: records need 'text' or 'prompt'+'completion' fields "
                         f"(pass a DatasetSpec to name others); {path!r} has {found}")


def _positive_int(task: LoRATask, name: str) -> None:
    value = getattr(task, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoRATask.{name}: must be a positive integer, got {value!r}")


def _stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(str(path))) or str(path)
    base = base.rsplit(".", 1)[0] if "." in base and not base.startswith(".") else base
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "x"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _describe(dataset: Any) -> Any:
    if isinstance(dataset, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(os.fspath(dataset)))
    if dataclasses.is_dataclass(dataset):
        return {k: repr(v) for k, v in sorted(dataclasses.asdict(dataset).items())}
    return repr(dataset)
