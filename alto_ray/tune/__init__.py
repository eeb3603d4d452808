"""alto_ray.tune: the Ray Tune layer (trainable, adapter groups, early-exit scheduler)."""
from alto_ray.tune.scheduler import AltoScheduler, StopReason

__all__ = ["AltoScheduler", "StopReason"]
from alto_ray.tune.group import AdapterGroup  # noqa: E402
from alto_ray.tune.task import GroupSpec, LoRATask  # noqa: E402
from alto_ray.tune.trainable import lora_trainable  # noqa: E402

__all__ += ["AdapterGroup", "GroupSpec", "LoRATask", "lora_trainable"]
