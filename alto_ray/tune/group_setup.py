"""How an `AdapterGroup` builds what it trains: the trial's adapter config, the trainer (one
`GroupedTrainer`, or a factory's rank-local group), its device and dtype. Kept apart from the
actor so that its state machine reads on its own."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from alto_ray.tune.task import GroupSpec, LoRATask


def adapter_config(config: Dict[str, Any]) -> Any:
    """The engine `AdapterConfig` of a trial's merged config; ValueError naming the bad field."""
    from alto_ray.engine import AdapterConfig

    try:
        cfg = AdapterConfig.from_dict(config)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid trial config: {err}") from err
    return cfg


def make_trainer(task: LoRATask, spec: GroupSpec, device: str, dtype: Any) -> Any:
    """The group's trainer: `spec.trainer`'s factory when set (a rank-local group whose backbone
    spans several GPUs), else one `GroupedTrainer` on this process's `device`."""
    factory = spec.trainer_factory()
    if factory is not None:
        return factory(task, spec, dataset=_dataset_spec(task), dtype=dtype, **spec.trainer_kwargs)
    from alto_ray.engine import DEFAULT_TARGET_MODULES, GroupedTrainer

    model = task.model if isinstance(task.model, str) else task.model()
    return GroupedTrainer(model=model, dataset=_dataset_spec(task), device=device, dtype=dtype,
                          eval_size=task.eval_size, target_modules=task.target_modules or DEFAULT_TARGET_MODULES,
                          cuda_graphs=task.cuda_graphs)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dataset_spec(task: LoRATask) -> Any:
    """A path becomes a DatasetSpec whose held-out split is `eval_size` examples."""
    if isinstance(task.dataset, (str, os.PathLike)):
        from alto_ray.engine import DatasetSpec

        return DatasetSpec(source=os.fspath(task.dataset), eval_size=task.eval_size)
    return task.dataset


def torch_dtype(name: Optional[str]) -> Any:
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
            "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]
