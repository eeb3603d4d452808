"""Python's cyclic garbage collector held off for the span of a training step.

A grouped step makes and drops thousands of small Python objects (tensors' wrappers, autograd
nodes' tuples, per-layer plan lookups). Their transient peaks cross the collector's generation-0
threshold several times a step, so collections land mid-step: each scans the step's live
temporaries (~0.2 ms on the dev machine), and every ~100th escalates to a full collection over
every object the process holds (a few hundred thousand once torch, transformers and Triton are
loaded: 170-220 ms, several steps' worth). On a host-bound step that time is the step's; on a
GPU-bound one a full collection outlasts the launch queue and idles the GPU.

Held off for the step, the collector never runs inside it: by the step's end its temporaries
are freed by reference counting, so the generation-0 count is back near where it started and
the collection that follows (if any) happens between steps, over little. Garbage in reference
cycles is still collected, just never in the middle of a step. Measured on the dev machine
(tiny Llama, 8 adapters, 200 steps; ``benchmarks/gc_step.py``): see BENCHMARKS.md, Engine.

The state is restored on exit (a caller that had the collector off keeps it off), so a process
running other work beside a trainer sees the collector as it left it. ``ALTO_PAUSE_GC=0`` or
``GroupedTrainer(pause_gc=False)`` turns this off.
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator, Optional


def pause_gc_default(requested: Optional[bool] = None) -> bool:
    """``requested``, or the environment's ``ALTO_PAUSE_GC`` (default on)."""
    if requested is not None:
        return bool(requested)
    return os.environ.get("ALTO_PAUSE_GC", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def gc_paused(enabled: bool = True) -> Iterator[None]:
    """No cyclic collection inside the block (when ``enabled`` and the collector is on)."""
    if not enabled or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
