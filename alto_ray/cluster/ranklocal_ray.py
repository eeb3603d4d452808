"""``RankLocalGroup``: a rank-local adapter group as N Ray actors (one per GPU), one API.

The group looks like a single-GPU group to its caller (add / step / remove / state / save), but
its backbone is FSDP2-sharded over N actors that form one ``torch.distributed`` process group,
and each adapter lives on exactly one rank (``ranklocal.py`` explains why no gradient ever
crosses ranks). The actors sit in one STRICT_PACK placement group (one bundle per rank), so the
all-gathers stay on one node's NVLink; rank 0's node IP and a free port there are the rendezvous.

Tune reaches it through ``rank_local_trainer``, the trainer factory that ``LoRATask(gpus_per_group=N)``
groups name: the ``AdapterGroup`` actor drives a ``RankLocalGroup`` as its trainer, and admits
adapters against each rank's memory (``memory_budget``).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, StepResult, TaskData

from .ranklocal_model import NCCL_GUARDS

# A backbone source: a checkpoint (path / hub id, loaded then sharded on each rank), or a
# callable ``build(device) -> nn.Module`` run on each rank after the process group is up that
# returns an already-sharded backbone (e.g. ``build_random_sharded_backbone`` for benchmarks).
BackboneSource = Union[str, Callable[[torch.device], Any]]


class RankLocalWorker:
    """One rank: owns the process-group membership, the shard and this rank's adapters."""

    def __init__(self, rank: int, world_size: int) -> None:
        for key, value in NCCL_GUARDS.items():
            os.environ.setdefault(key, value)
        self.rank, self.world_size = rank, world_size
        self.trainer: Any = None

    def __repr__(self) -> str:  # the Ray dashboard's actor name
        return f"RankLocalWorker(rank {self.rank} of {self.world_size})"

    def gpu_ids(self) -> List[str]:
        """The GPUs Ray gave this actor (before CUDA is initialised here)."""
        import ray
        return [str(g) for g in ray.get_gpu_ids()]

    def where(self) -> tuple:
        """(node IP, this actor's GPU ids)."""
        import ray
        return ray.util.get_node_ip_address(), self.gpu_ids()

    def address(self) -> tuple:
        """(node IP, a free port on it): rank 0's answer is every rank's rendezvous."""
        import ray

        from .ranklocal_model import free_port
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, model: BackboneSource,
              dataset: Union[DatasetSpec, TaskData], use_gpu: bool, dtype: Optional[torch.dtype],
              trainer_kwargs: Dict[str, Any], dist_backend: Optional[str],
              node_gpus: Optional[List[str]] = None) -> Dict[str, Any]:
        import ray

        from alto_ray.tune.admission import free_bytes

        from .ranklocal import RankLocalTrainer
        from .ranklocal_model import (gathered_unit_bytes, init_rank_process_group, load_sharded_backbone,
                                      local_shard_numel)

        device = torch.device("cpu")
        if use_gpu:
            # Like Ray Train: every rank sees all the group's GPUs of its node (NCCL then finds
            # the NVLink peers) and picks its own by index.
            index = 0
            if node_gpus:
                mine = self.gpu_ids()[0]
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
                index = node_gpus.index(mine)
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        init_rank_process_group(self.rank, self.world_size, master_addr, master_port, dist_backend, device)
        backbone = model(device) if callable(model) else load_sharded_backbone(model, device, dtype)
        kwargs = dict(trainer_kwargs)
        if isinstance(model, str):
            kwargs.setdefault("tokenizer", model)
        self.trainer = RankLocalTrainer(backbone, dataset, device=device, dtype=dtype, **kwargs)
        self._device, self._gather_bytes = device, gathered_unit_bytes(backbone)
        self._base_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        return {"rank": self.rank, "device": str(device), "shard_numel": local_shard_numel(backbone),
                "node": ray.util.get_node_ip_address(), "free_bytes": free_bytes(device.type),
                "gather_bytes": gathered_unit_bytes(backbone), "model_config": getattr(backbone, "config", None),
                "dtype": self.trainer.trainer.dtype}

    # Thin pass-throughs (Ray calls methods by name).
    def add_adapter(self, name: str, cfg: AdapterConfig, state: Optional[Dict[str, Any]] = None) -> None:
        self.trainer.add_adapter(name, cfg, state)

    def remove_adapter(self, name: str) -> None:
        self.trainer.remove_adapter(name)

    def step(self, micro_steps: int, count: bool = False) -> Dict[str, Any]:
        """``{"results": {name: StepResult}, "collectives": counts or None, "peak_bytes": int or None}``."""
        if not count:
            results, counts = self.trainer.step(micro_steps), None
        else:
            from .ranklocal import count_collectives
            with count_collectives() as counted:
                results = self.trainer.step(micro_steps)
            counts = dict(counted)
        return {"results": results, "collectives": counts, "peak_bytes": self._step_peak_bytes()}

    def _step_peak_bytes(self) -> Optional[int]:
        """The step's peak device memory above the loaded shard, less the unsharded units it
        gathers (admission budgets those separately): what this rank's adapters cost. GPU only."""
        if getattr(self, "_device", None) is None or self._device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self._device) - self._base_bytes - self._gather_bytes
        torch.cuda.reset_peak_memory_stats(self._device)
        return max(int(peak), 0)

    def eval_passes(self, names: Optional[Sequence[str]] = None) -> int:
        return self.trainer.eval_passes(names)

    def evaluate(self, names: Optional[Sequence[str]] = None, passes: Optional[int] = None) -> Dict[str, float]:
        return self.trainer.evaluate(names, passes)

    def adapter_state(self, name: str) -> Dict[str, Any]:
        return self.trainer.adapter_state(name)

    def adapter_files(self, name: str) -> Dict[str, bytes]:
        """The PEFT directory of ``name`` as ``{file name: bytes}`` (the caller may be on another node)."""
        files: Dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="alto-rank-") as tmp:
            self.trainer.save_adapter(name, tmp)
            for fname in os.listdir(tmp):
                with open(os.path.join(tmp, fname), "rb") as f:
                    files[fname] = f.read()
        return files

    def info(self) -> Dict[str, Any]:
        from .ranklocal import lora_param_count
        return {"rank": self.rank, "adapters": self.trainer.adapter_names,
                "lora_numel": lora_param_count(self.trainer),
                "padding_micro_steps": self.trainer.padding_micro_steps}

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailure(RuntimeError):
    """A rank of a rank-local group failed (out of memory, process lost): the group is gone."""


class RankLocalGroup:
    """N ranks, one sharded backbone, adapters spread over the ranks; the API of one group.

    ``placement_group`` (with ``bundle_indices``) lets the coordinator hand in the bundles it
    planned; by default the group creates its own STRICT_PACK one and removes it on shutdown.
    ``add_adapter`` routes to the least-loaded rank (tokens per step, then adapter count).
    ``step`` is one optimizer step of every adapter on every rank, in lock-step.
    """

    def __init__(self, model: BackboneSource, dataset: Union[DatasetSpec, TaskData], num_ranks: int = 2,
                 use_gpu: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                 placement_group: Any = None, bundle_indices: Optional[Sequence[int]] = None,
                 trainer_kwargs: Optional[Dict[str, Any]] = None, dist_backend: Optional[str] = None,
                 cpus_per_rank: float = 1, ready_timeout_s: float = 600.0) -> None:
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_ranks < 1:
            raise ValueError(f"num_ranks={num_ranks}: must be >= 1")
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= num_ranks
        self.num_ranks, self.use_gpu = num_ranks, bool(use_gpu)
        self._owns_pg = placement_group is None
        if placement_group is None:
            bundle = {"CPU": cpus_per_rank, **({"GPU": 1} if use_gpu else {})}
            placement_group = make_pg([dict(bundle) for _ in range(num_ranks)], strategy="STRICT_PACK")
            try:
                ray.get(placement_group.ready(), timeout=ready_timeout_s)
            except Exception as exc:
                ray.util.remove_placement_group(placement_group)
                raise RuntimeError(f"RankLocalGroup: no node can hold {num_ranks} x {bundle} "
                                   f"(STRICT_PACK) within {ready_timeout_s:.0f}s") from exc
        self.placement_group = placement_group
        indices = list(bundle_indices) if bundle_indices is not None else list(range(num_ranks))
        if len(indices) != num_ranks:
            raise ValueError(f"bundle_indices: {len(indices)} given for {num_ranks} ranks")
        actor_cls = ray.remote(RankLocalWorker)
        self.workers = [
            actor_cls.options(num_cpus=cpus_per_rank, num_gpus=1 if use_gpu else 0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  placement_group, placement_group_bundle_index=idx)).remote(rank, num_ranks)
            for rank, idx in enumerate(indices)]
        try:
            addr, port = ray.get(self.workers[0].address.remote())
            node_gpus = None
            if self.use_gpu:
                where = ray.get([w.where.remote() for w in self.workers])
                if len({ip for ip, _ in where}) == 1:  # one node (STRICT_PACK): share its group GPUs
                    node_gpus = sorted({g for _, ids in where for g in ids}, key=lambda g: (len(g), g))
            self.rank_info: List[Dict[str, Any]] = ray.get([
                w.setup.remote(addr, port, model, dataset, self.use_gpu, dtype, dict(trainer_kwargs or {}),
                               dist_backend, node_gpus) for w in self.workers])
        except Exception:
            self.shutdown()
            raise
        self.broken: Optional[str] = None  # why the group can no longer step (see _gather)
        self.last_peak_bytes: List[Optional[int]] = [None] * num_ranks  # per rank, last step (GPU)
        self._owner: Dict[str, int] = {}
        self._configs: Dict[str, AdapterConfig] = {}

    # -- what admission needs: the ranks' memory, the backbone's shape -------------------------------
    @property
    def model_config(self) -> Any:
        return self.rank_info[0].get("model_config")

    @property
    def dtype(self) -> torch.dtype:
        """The ranks' compute dtype (what the engine's memory estimates are taken in)."""
        return self.rank_info[0]["dtype"]

    def rank_budget_bytes(self) -> float:
        """Free bytes each rank had once its shard loaded, less the unsharded units it gathers;
        ranks sharing a node's host memory (CPU ranks) split it. The smallest rank's figure."""
        per_node: Dict[str, int] = {}
        for info in self.rank_info:
            per_node[info["node"]] = per_node.get(info["node"], 0) + 1
        return min(info["free_bytes"] / (1 if self.use_gpu else per_node[info["node"]]) - info["gather_bytes"]
                   for info in self.rank_info)

    def memory_budget(self, headroom: float, max_adapters: Optional[int]) -> Any:
        """The `AdapterGroup`'s admission for this group: per rank, against the rank it routes to."""
        from alto_ray.tune.admission import RankMemoryBudget

        return RankMemoryBudget(self.model_config, self.dtype, headroom, max_adapters,
                                self.rank_budget_bytes(), placement=lambda: self.placement, route=self.route,
                                peaks=lambda: self.last_peak_bytes)

    # -- membership ------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        return list(self._owner)

    @property
    def num_adapters(self) -> int:
        return len(self._owner)

    @property
    def placement(self) -> Dict[str, int]:
        """adapter -> the rank that holds it (its weights, grads and optimizer live only there)."""
        return dict(self._owner)

    def rank_load(self) -> List[int]:
        """Tokens per step that each rank's adapters ask for (the routing measure)."""
        load = [0] * self.num_ranks
        for name, rank in self._owner.items():
            c = self._configs[name]
            load[rank] += c.batch_size * c.max_seq_len * c.grad_accum
        return load

    def add_adapter(self, name: str, cfg: AdapterConfig, state: Optional[Dict[str, Any]] = None,
                    rank: Optional[int] = None) -> int:
        """Admit ``name`` on ``rank`` (default: the least-loaded one); returns the rank."""
        import ray

        cfg.validate()
        if name in self._owner:
            raise ValueError(f"adapter {name!r} is already in this group")
        if rank is None:
            rank = self.route(cfg)
        ray.get(self.workers[rank].add_adapter.remote(name, cfg, state))
        self._owner[name], self._configs[name] = rank, cfg
        return rank

    def route(self, cfg: AdapterConfig) -> int:
        """The rank ``add_adapter`` would give ``cfg`` now: the least-loaded one (tokens per step,
        then adapter count, then index). Admission asks it first, so it charges the right rank."""
        load = self.rank_load()
        counts = [sum(1 for r in self._owner.values() if r == k) for k in range(self.num_ranks)]
        return min(range(self.num_ranks), key=lambda k: (load[k], counts[k], k))

    def remove_adapter(self, name: str) -> None:
        import ray

        rank = self._rank_of(name)
        ray.get(self.workers[rank].remove_adapter.remote(name))
        del self._owner[name], self._configs[name]

    # -- the lock-step step ------------------------------------------------------------------------
    def micro_steps(self) -> int:
        """Packed passes of the next step on every rank: the max ``grad_accum`` in the group."""
        return max((c.grad_accum for c in self._configs.values()), default=0)

    def step(self) -> Dict[str, StepResult]:
        """One optimizer step of every adapter (every rank steps together); merged results."""
        return self.step_with_stats()[0]

    def step_with_stats(self, count_collectives: bool = False) -> tuple:
        """``step`` plus per-rank collective counts (``count_collectives=True``; for checks)."""
        import ray

        if not self._owner:
            return {}, [None] * self.num_ranks
        outs = self._gather([w.step.remote(self.micro_steps(), count_collectives) for w in self.workers], "step")
        self.last_peak_bytes = [out.get("peak_bytes") for out in outs]
        merged: Dict[str, StepResult] = {}
        for out in outs:
            merged.update(out["results"])
        return merged, [out["collectives"] for out in outs]

    def evaluate(self, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Eval loss of ``names`` (default: all); every rank runs the most forwards any rank needs."""
        import ray

        passes = max(self._gather([w.eval_passes.remote(names) for w in self.workers], "evaluate"))
        merged: Dict[str, float] = {}
        if passes == 0:
            return merged
        for part in self._gather([w.evaluate.remote(names, passes) for w in self.workers], "evaluate"):
            merged.update(part)
        return merged

    # -- state, from the owning rank ----------------------------------------------------------------
    def adapter_state(self, name: str) -> Dict[str, Any]:
        import ray
        return ray.get(self.workers[self._rank_of(name)].adapter_state.remote(name))

    def save_adapter(self, name: str, path: str) -> None:
        """PEFT directory of ``name`` at ``path`` on the caller's node (the owning rank sends the bytes)."""
        import ray

        files = ray.get(self.workers[self._rank_of(name)].adapter_files.remote(name))
        os.makedirs(path, exist_ok=True)
        for fname, data in files.items():
            with open(os.path.join(path, fname), "wb") as f:
                f.write(data)

    def info(self) -> List[Dict[str, Any]]:
        import ray
        return ray.get([w.info.remote() for w in self.workers])

    def _gather(self, refs: List[Any], what: str) -> List[Any]:
        """All ranks' answers to one collective call, or ``RankFailure`` as soon as one rank fails.

        The other ranks are then blocked in a collective the failed rank will never join (until
        the process group's timeout, minutes): the group kills them all and is ``broken``; its
        owner drops it and its trials resume from their checkpoints on a new one.
        """
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as err:
                rank = refs.index(done[0])
                self.broken = f"rank {rank} failed in {what}: {type(err).__name__}: {err}"
                self.shutdown(graceful=False)  # the others cannot leave a collective to shut down
                raise RankFailure(self.broken) from err
        return ray.get(refs)

    def shutdown(self, graceful: bool = True) -> None:
        """Leave the process group, end the actors, free the bundles (if this group made them)."""
        import ray

        workers, self.workers = getattr(self, "workers", []), []
        if graceful:
            try:
                ray.get([w.shutdown.remote() for w in workers], timeout=60)
            except Exception:
                pass
        for w in workers:
            ray.kill(w)
        if self._owns_pg and getattr(self, "placement_group", None) is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

    def _rank_of(self, name: str) -> int:
        if name not in self._owner:
            raise KeyError(f"no adapter {name!r} in this group")
        return self._owner[name]


# ---------------------------------------------------------------------- the Tune path
def rank_local_trainer(task: Any, spec: Any, *, dataset: Union[DatasetSpec, TaskData],
                       dtype: Optional[torch.dtype] = None, num_ranks: int = 2, use_gpu: Optional[bool] = None,
                       cpus_per_rank: float = 1.0, placement_group: Any = None,
                       bundle_indices: Optional[Sequence[int]] = None) -> RankLocalGroup:
    """``GroupSpec.trainer`` factory for a ``LoRATask`` whose backbone spans ``num_ranks`` GPUs.

    The ``AdapterGroup`` actor (``task``, ``spec``: its own) drives the returned group exactly
    like a ``GroupedTrainer``; the GPUs belong to the rank workers, placed in ``placement_group``
    (the coordinator's grant) or, by default, in a STRICT_PACK one the group creates and that
    goes away with the ``AdapterGroup`` actor. ``spec.trainer_kwargs`` fill the keyword arguments.
    """
    from alto_ray.engine import DEFAULT_TARGET_MODULES

    model: BackboneSource = task.model if isinstance(task.model, str) else ShardedFactory(task.model, dtype)
    return RankLocalGroup(model, dataset, num_ranks=num_ranks, use_gpu=use_gpu, dtype=dtype,
                          placement_group=placement_group, bundle_indices=bundle_indices,
                          cpus_per_rank=cpus_per_rank,
                          trainer_kwargs={"eval_size": task.eval_size,
                                          "target_modules": tuple(task.target_modules or DEFAULT_TARGET_MODULES)})


class ShardedFactory:
    """A zero-argument model factory (``LoRATask.model``) as a ``BackboneSource``: each rank
    builds the model on the host, then shards it onto its device (cast to ``dtype`` if given)."""

    def __init__(self, factory: Callable[[], Any], dtype: Optional[torch.dtype] = None) -> None:
        self.factory, self.dtype = factory, dtype

    def __call__(self, device: torch.device) -> Any:
        from .ranklocal_model import shard_backbone

        model = self.factory()
        if self.dtype is not None:
            model = model.to(self.dtype)
        return shard_backbone(model, device=device)
