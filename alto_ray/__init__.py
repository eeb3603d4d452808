"""alto-ray: a Ray Tune backend that trains many LoRA adapters together over one frozen backbone.

Layers (inner never importing outer): ``alto_kernels`` → ``alto_ray.engine`` → ``alto_ray.tune``
→ ``alto_ray.cluster``. Nothing from the outer layers is re-exported here yet.
"""
__version__ = "0.1.0"

_TUNE_EXPORTS = ("AltoScheduler", "LoRATask", "lora_trainable")
__all__ = ["__version__", *_TUNE_EXPORTS]


def __getattr__(name: str):
    """`from alto_ray import AltoScheduler, LoRATask, lora_trainable`, imported on first use so
    that `import alto_ray.engine` stays free of Ray."""
    if name in _TUNE_EXPORTS:
        import alto_ray.tune as _tune

        return getattr(_tune, name)
    raise AttributeError(f"module 'alto_ray' has no attribute {name!r}")
