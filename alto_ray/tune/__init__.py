"""alto_ray.tune: the Ray Tune layer (trainable, adapter groups, early-exit scheduler)."""
from alto_ray.tune.scheduler import AltoScheduler, StopReason

__all__ = ["AltoScheduler", "StopReason"]
