"""``StepGraphs``: a grouped micro-step (forward, loss, backward) captured as one CUDA graph per
batch shape and replayed.

Why: below a few billion parameters the grouped step is host-bound. On an H100 the Llama-1B-shape
step took 108-114 ms of wall time for 60 ms of GPU work (``benchmarks/engine_profile.py
--host``): Python and launch cost of ~1,500 kernels, the LoRA nodes' own share 41-58 ms. A
replay launches all of them in one call.

What a replay cannot change is in the key the caller gives (the batch's shapes and row layout,
which adapters, a generation the trainer bumps when adapters join or leave). What it reads
fresh each time: the ``inputs`` copied into the graph's static copies before each replay (the
batch's one device buffer, the accumulation weights), each adapter's compute weights (copied
from its fp32 master inside the graph) and the dropout streams (a persistent table the model
writes before the replay). Gradients land where the eager step puts them: the kernels add into
each adapter's ``master.grad``.

A key is captured on its second sighting (the first runs eagerly and warms up what a capture
cannot do: autotuning, compiling, the kernels' plans), so a workload whose shapes never repeat
runs eagerly at no extra cost. A failed capture turns graphs off for the trainer, with a
warning, and that micro-step runs eagerly.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: List[torch.Tensor]  # the static copies the graph reads
    output: torch.Tensor        # what the graph writes: valid until the next replay
    keep: List[Any]             # objects whose device memory the graph reads (kernel plans)


class StepGraphs:
    """CUDA graphs of one trainer's micro-steps, by key; at most ``max_graphs`` kept (they share
    one memory pool: they never run concurrently)."""

    def __init__(self, max_graphs: int = 2, sightings_before_capture: int = 1) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs: must be >= 1, got {max_graphs}")
        self.max_graphs = int(max_graphs)
        self.sightings_before_capture = int(sightings_before_capture)
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._seen: "OrderedDict[Hashable, int]" = OrderedDict()
        self._pool: Optional[Any] = None
        self._stream: Optional[Any] = None  # the side stream captures run on
        self.disabled: Optional[str] = None  # why graphs are off, once a capture failed
        self.stats: Dict[str, int] = {"eager": 0, "captures": 0, "replays": 0, "failures": 0}

    def invalidate(self) -> None:
        """Forget every graph: what they captured (adapter buffers, plans) may be gone."""
        self._graphs.clear()
        self._seen.clear()

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor],
            body: Callable[[Sequence[torch.Tensor]], torch.Tensor],
            keep: Callable[[], List[Any]] = list) -> torch.Tensor:
        """``body(inputs)``: eagerly, or by replaying its graph for ``key``. ``body`` must read
        only ``inputs`` and state that outlives the graph, and return one tensor. ``keep()``
        (called after a capture) lists objects the graph must keep alive."""
        if self.disabled is not None:
            return self._eager(body, inputs)
        captured = self._graphs.get(key)
        if captured is None:
            seen = self._seen.pop(key, 0)
            self._seen[key] = seen + 1
            while len(self._seen) > 64:
                self._seen.popitem(last=False)
            if seen < self.sightings_before_capture:
                # The last eager sighting runs on the capture stream: what a stream's first use
                # sets up (cuBLAS's workspace for it, ...) is then there before the capture.
                return self._eager(body, inputs, on_capture_stream=seen + 1 == self.sightings_before_capture)
            captured = self._capture(key, inputs, body, keep)
            if captured is None:
                return self._eager(body, inputs)
        else:
            self._graphs.move_to_end(key)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        self.stats["replays"] += 1
        return captured.output

    def _eager(self, body: Callable[[Sequence[torch.Tensor]], torch.Tensor],
               inputs: Sequence[torch.Tensor], on_capture_stream: bool = False) -> torch.Tensor:
        self.stats["eager"] += 1
        if not on_capture_stream:
            return body(inputs)
        stream, current = self._capture_stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            output = body(inputs)
        current.wait_stream(stream)
        return output

    def _capture_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _capture(self, key: Hashable, inputs: Sequence[torch.Tensor],
                 body: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                 keep: Callable[[], List[Any]]) -> Optional[_Captured]:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        static = [x.detach().clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with causal_mask_skip(), torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream()):
                output = body(static)
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly from now on
            self.disabled = f"{type(err).__name__}: {err}"
            self.stats["failures"] += 1
            self.invalidate()
            torch.cuda.synchronize()
            logger.warning("CUDA graph capture failed (%s); the grouped step runs eagerly from now on",
                           self.disabled)
            return None
        self.stats["captures"] += 1
        captured = _Captured(graph, static, output, keep())
        self._graphs[key] = captured
        return captured


@contextlib.contextmanager
def causal_mask_skip(capturing: Callable[[], bool] = lambda: torch.cuda.is_current_stream_capturing()
                     ) -> Iterator[None]:
    """While capturing, let transformers conclude what it concludes eagerly for the trainer's
    batches, which have no padding mask and one sequence per row: no mask for SDPA
    (``is_causal``, FlashAttention).

    transformers cannot read device values while a stream is capturing, so it assumes the worst
    twice: (1) ``find_packed_sequence_indices`` keeps the packed-sequence ids it computed from
    ``position_ids`` (it cannot check they are all 0) and (2) before 5.2x,
    ``_ignore_causal_mask_sdpa`` refuses the skip outright. Either way it builds an explicit
    causal mask and SDPA runs memory-efficient attention: +26 ms of the Llama-8B-shape step
    (8 x 512 tokens, H100, ``benchmarks/graph_step.py --profile``). The trainer never passes
    ``position_ids`` (the model makes one ``arange`` per row), so (1) is known to be ``None``;
    (2) is answered as the function answers eagerly when there is no padding mask. Both only
    while ``capturing()``; any other call goes to transformers unchanged.
    """
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    patched: Dict[str, Callable[..., Any]] = {}
    find_packed = getattr(masking, "find_packed_sequence_indices", None)
    if find_packed is not None:
        def no_packed_sequences(*args: Any, **kwargs: Any) -> Any:
            return None if capturing() else find_packed(*args, **kwargs)
        patched["find_packed_sequence_indices"] = no_packed_sequences
    ignore_mask = getattr(masking, "_ignore_causal_mask_sdpa", None)
    if ignore_mask is not None:
        signature = inspect.signature(ignore_mask)

        def skip_without_padding(*args: Any, **kwargs: Any) -> Any:
            if capturing():
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                q_len = a.get("q_length", a.get("query_length"))
                kv_len, local = a.get("kv_length"), a.get("local_attention_size")
                if (a.get("padding_mask") is None and q_len is not None and q_len == kv_len
                        and (local is None or kv_len < local)):
                    return True
            return ignore_mask(*args, **kwargs)
        patched["_ignore_causal_mask_sdpa"] = skip_without_padding
    originals = {name: getattr(masking, name) for name in patched}
    for name, fn in patched.items():
        setattr(masking, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(masking, name, fn)
