"""The grouped step eager vs replayed as a CUDA graph (``GroupedTrainer(cuda_graphs=True)``).

Per model shape (benchmarks/engine.py's Llama-1B / Llama-8B configs, random bf16 weights), one
trainer, 8 adapters x 1x512 tokens:

  check   the same 8 adapters (ranks 8-64, dropout 0.1, own lrs and seeds) trained --check-steps
          steps eagerly, removed, added again (same seeds: same init, data order and dropout
          masks) and trained the same steps with graphs on: every step's loss and the final fp32
          weights compared.
  timing  8 r16 adapters, dropout 0 (engine.py's case): median step time eager and with
          graphs, alternating --rounds times in this process; tokens/s and peak memory.

    python benchmarks/graph_step.py --shapes 1b,8b --out benchmarks/results/graph_step_h100.json \
        --summary benchmarks/results/summary.json      # engine.graph_over_eager_<shape>, CUDA only
    python benchmarks/graph_step.py --smoke       # CPU: graphs are off there; checks the plumbing
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alto_ray.engine import AdapterConfig, GroupedTrainer, TaskData  # noqa: E402


def _engine_module() -> Any:
    spec = importlib.util.spec_from_file_location("_alto_bench_engine", Path(__file__).resolve().parent / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _configs(n: int, seq: int, ranks: List[int], dropout: float) -> Dict[str, AdapterConfig]:
    return {f"a{i}": AdapterConfig(rank=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)], dropout=dropout,
                                   lr=1e-4 * (i + 1), batch_size=1, max_seq_len=seq, max_steps=10_000, seed=i,
                                   lr_schedule="constant", max_grad_norm=1.0)
            for i in range(n)}


def _train(trainer: GroupedTrainer, cfgs: Dict[str, AdapterConfig], steps: int, graphs: bool,
           device: torch.device, record_grads: bool = False) -> Dict[str, Any]:
    """Add ``cfgs``, train ``steps`` steps, remove them: losses per step, step times, weights."""
    trainer.use_cuda_graphs(graphs)
    for name, cfg in cfgs.items():
        trainer.add_adapter(name, cfg)
    losses: List[Dict[str, float]] = []
    times: List[float] = []
    grads: List[Dict[str, torch.Tensor]] = []
    if record_grads:
        grads_now: Dict[str, torch.Tensor] = {}
        trainer.grad_hook = lambda name, g: grads_now.__setitem__(name, g.detach().float().cpu().clone())
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        res = trainer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append({k: r.loss for k, r in res.items()})
        if record_grads:
            grads.append(dict(grads_now))
    trainer.grad_hook = None
    weights = {n: trainer.model.adapters[n].master.detach().float().cpu().clone() for n in cfgs}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else None
    stats = trainer.graph_stats
    for name in cfgs:
        trainer.remove_adapter(name)
    trainer.use_cuda_graphs(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"losses": losses, "times": times, "weights": weights, "grads": grads, "peak_bytes": peak, "reserved_bytes": reserved,
            "graph_stats": stats}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _gaps(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, float]:
    """Largest relative gaps between two runs: per-step losses, per-step gradients (norm of the
    difference over the norm, before clipping) and final weights (same, per adapter)."""
    loss = max(_rel(x[n], y[n]) for x, y in zip(a["losses"], b["losses"]) for n in x)
    grad = max(float((x[n] - y[n]).norm() / x[n].norm().clamp_min(1e-30))
               for x, y in zip(a["grads"], b["grads"]) for n in x)
    first = max(float((a["grads"][0][n] - b["grads"][0][n]).norm() / a["grads"][0][n].norm().clamp_min(1e-30))
                for n in a["grads"][0])
    weight = max(float((a["weights"][n] - b["weights"][n]).norm() / a["weights"][n].norm().clamp_min(1e-30))
                 for n in a["weights"])
    return {"loss": loss, "grad": grad, "grad_first_step": first, "weight": weight}


@contextlib.contextmanager
def _sdpa_calls():
    """Count what attention got: (capturing a graph, mask is None, is_causal) -> calls."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    calls: Counter = Counter()

    def counting(*a, **kw):
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        calls[(capturing, kw.get("attn_mask") is None and (len(a) < 4 or a[3] is None), bool(kw.get("is_causal")))] += 1
        return original(*a, **kw)

    F.scaled_dot_product_attention = counting
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def _profile(trainer: GroupedTrainer, cfgs: Dict[str, AdapterConfig], device: torch.device) -> Dict[str, Any]:
    """Device time per kernel name over 3 steps, eager and replayed: where a difference is."""
    from torch.profiler import ProfilerActivity, profile

    out: Dict[str, Any] = {}
    for mode, on in (("eager", False), ("graph", True)):
        trainer.use_cuda_graphs(on)
        for name, cfg in cfgs.items():
            trainer.add_adapter(name, cfg)
        for _ in range(3):
            trainer.step()
        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                trainer.step()
            _sync(device)
        totals: Counter = Counter()
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                totals[evt.name[:90]] += evt.device_time_total / 3.0
        out[mode] = {"device_ms_per_step": sum(totals.values()) / 1e3,
                     "top_us_per_step": dict(totals.most_common(25))}
        for name in cfgs:
            trainer.remove_adapter(name)
        trainer.use_cuda_graphs(False)
    diff = Counter()
    for k in set(out["eager"]["top_us_per_step"]) | set(out["graph"]["top_us_per_step"]):
        diff[k] = out["graph"]["top_us_per_step"].get(k, 0.0) - out["eager"]["top_us_per_step"].get(k, 0.0)
    out["graph_minus_eager_us"] = dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:15])
    print(f"profile: device ms/step eager {out['eager']['device_ms_per_step']:.1f}, graph "
          f"{out['graph']['device_ms_per_step']:.1f}; largest differences (us/step):", flush=True)
    for k, v in out["graph_minus_eager_us"].items():
        print(f"  {v:+9.1f}  {k}", flush=True)
    return out


def run_shape(bench: Any, shape: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> Dict[str, Any]:
    vocab = bench.SHAPES[shape]["vocab_size"]
    data = TaskData.from_examples(bench.random_examples(64, args.seq, vocab, seed=1))
    trainer = GroupedTrainer(bench.build_backbone(shape, device, dtype), data, device=device, backend="auto")
    out: Dict[str, Any] = {"graphs_available": trainer.use_cuda_graphs(True)}
    trainer.use_cuda_graphs(False)

    cfgs = _configs(args.adapters, args.seq, [8, 16, 32, 64], 0.1)
    with _sdpa_calls() as calls:
        eager = _train(trainer, cfgs, args.check_steps, False, device, record_grads=True)
        eager2 = _train(trainer, cfgs, args.check_steps, False, device, record_grads=True)
        graph = _train(trainer, cfgs, args.check_steps, True, device, record_grads=True)
    out["check"] = {"steps": args.check_steps, "ranks": [c.rank for c in cfgs.values()], "dropout": 0.1,
                    "eager_vs_eager": _gaps(eager, eager2), "eager_vs_graph": _gaps(eager, graph),
                    "losses_eager_first_last": [eager["losses"][0], eager["losses"][-1]],
                    "losses_graph_first_last": [graph["losses"][0], graph["losses"][-1]],
                    "graph_stats": graph["graph_stats"],
                    "sdpa_calls (capturing, mask is None, is_causal)": {str(k): v for k, v in calls.items()}}
    print(f"[{shape}] check, {args.check_steps} steps: eager vs eager {out['check']['eager_vs_eager']}; eager vs "
          f"graph {out['check']['eager_vs_graph']}; graph stats {graph['graph_stats']}; sdpa calls {dict(calls)}",
          flush=True)
    if args.profile:
        out["profile"] = _profile(trainer, _configs(args.adapters, args.seq, [args.rank], 0.0), device)

    cfgs = _configs(args.adapters, args.seq, [args.rank], 0.0)
    tokens = args.adapters * args.seq
    rounds = []
    for r in range(args.rounds):
        row = {}
        for mode, on in (("eager", False), ("graph", True)):
            res = _train(trainer, cfgs, args.warmup + args.iters, on, device)
            step = statistics.median(res["times"][args.warmup:])
            row[mode] = {"step_seconds": step, "tokens_per_s": tokens / step, "first_steps_s": res["times"][:args.warmup],
                         "peak_bytes": res["peak_bytes"], "reserved_bytes": res["reserved_bytes"],
                         "graph_stats": res["graph_stats"]}
        row["graph_over_eager"] = row["graph"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        rounds.append(row)
        gib = lambda b: (b or 0) / 2 ** 30
        print(f"[{shape}] round {r + 1}: eager {row['eager']['tokens_per_s']:.0f} tok/s "
              f"({row['eager']['step_seconds'] * 1e3:.1f} ms, peak {gib(row['eager']['peak_bytes']):.1f} GiB) | graph "
              f"{row['graph']['tokens_per_s']:.0f} tok/s ({row['graph']['step_seconds'] * 1e3:.1f} ms, peak "
              f"{gib(row['graph']['peak_bytes']):.1f} GiB) | {row['graph_over_eager']:.2f}x", flush=True)
    out["timing"] = {"adapters": args.adapters, "rank": args.rank, "seq": args.seq, "rounds": rounds,
                     "graph_over_eager_median": statistics.median(r["graph_over_eager"] for r in rounds)}
    del trainer
    return out


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--check-steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also: device time per kernel, eager vs replayed")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--summary", type=Path, default=None, help="merge engine.graph_over_eager_<shape> here (CUDA only)")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    bench = _engine_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        shapes, args.seq, args.check_steps, args.warmup, args.iters, args.rounds = ["smoke"], 32, 3, 1, 2, 1
    else:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    result: Dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "versions": bench.versions(), "command": command, "dtype": str(dtype), "shapes": {}}
    for shape in shapes:
        result["shapes"][shape] = run_shape(bench, shape, device, dtype, args)
        bench._free(device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.summary and device.type == "cuda":
        bench.merge_summary(args.summary, {
            f"engine.graph_over_eager_{shape}": {"value": r["timing"]["graph_over_eager_median"],
                                                 "device": result["device"], "command": command}
            for shape, r in result["shapes"].items()})
    return result


if __name__ == "__main__":
    main()
