"""alto-ray: a Ray Tune backend that trains many LoRA adapters together over one frozen backbone.

Layers (inner never importing outer): ``alto_kernels`` → ``alto_ray.engine`` → ``alto_ray.tune``
→ ``alto_ray.cluster``. Nothing from the outer layers is re-exported here yet.
"""
__version__ = "0.1.0"
