"""Where the grouped engine's step time goes at the benchmark's shape (CUDA kernels by total time).

Builds the same trainer as ``benchmarks/engine.py`` (8 r16 adapters × 1×512 tokens, random bf16
weights), warms up, then profiles a few steps with ``torch.profiler`` and prints the kernels that
take the most device time, grouped into families (GEMM, LoRA, attention, elementwise, loss, ...),
next to the step's wall time.

    python benchmarks/engine_profile.py [--shape 8b] [--steps 3] [--host]

``--host`` adds where the host's time goes (a host-bound step, like the 1B one): the CPU-side
events by self time, CUDA runtime and driver calls included, per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import SHAPES, build_backbone, random_examples  # noqa: E402

FAMILIES = [("lora", ("lora_",)), ("gemm", ("nvjet", "gemm", "sm90_xmma", "cutlass", "cublas")),
            ("attention", ("flash", "fmha", "attention", "efficient")),
            ("loss/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
            ("optimizer", ("adam", "multi_tensor", "foreach")),
            ("reduce/norm", ("reduce", "norm")), ("copy/cast", ("copy", "cast", "convert")),
            ("elementwise", ("elementwise", "vectorized", "unrolled"))]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--host", action="store_true", help="also the host-side events by self CPU time")
    args = ap.parse_args()
    from alto_ray.engine import AdapterConfig, GroupedTrainer, TaskData

    dev, dt = torch.device("cuda"), torch.bfloat16
    data = TaskData.from_examples(random_examples(64, args.seq, SHAPES[args.shape]["vocab_size"], seed=1))
    trainer = GroupedTrainer(build_backbone(args.shape, dev, dt), data, device=dev, backend="auto")
    for i in range(args.adapters):
        trainer.add_adapter(f"a{i}", AdapterConfig(rank=16, alpha=32, lr=1e-4, batch_size=1, max_seq_len=args.seq,
                                                   max_steps=10_000, seed=i, lr_schedule="constant",
                                                   max_grad_norm=1.0))
    for _ in range(3):
        trainer.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.host,
                 record_shapes=args.host) as prof:
        for _ in range(args.steps):
            trainer.step()
        torch.cuda.synchronize()
    # Kernels only: an aten op's device time is its kernels' again (counting both doubles it).
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.key.startswith(("aten::", "_Fused"))]
    by_fam: dict = defaultdict(float)
    rows = []
    for e in kernels:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        by_fam[family(e.key)] += us
        rows.append((us, e.count, e.key))
    total = sum(by_fam.values())
    print(f"{args.shape}: step wall {wall * 1e3:.1f} ms; device busy {total / args.steps / 1e3:.1f} ms per step")
    for fam, us in sorted(by_fam.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:14s} {us / args.steps / 1e3:8.2f} ms/step  {100 * us / total:5.1f}%")
    print("top kernels (ms per step, calls per step):")
    for us, count, key in sorted(rows, reverse=True)[:25]:
        print(f"  {us / args.steps / 1e3:8.2f}  {count // args.steps:5d}  {key[:110]}")
    if args.host:
        host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU
                and e.self_cpu_time_total > 0]
        busy = sum(e.self_cpu_time_total for e in host)
        print(f"host: {busy / args.steps / 1e3:.1f} ms of self CPU time per step in profiled events "
              f"(Python between them not counted); top events (ms per step, calls per step, us per call):")
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:30]:
            print(f"  {e.self_cpu_time_total / args.steps / 1e3:8.2f}  {e.count // args.steps:5d}  "
                  f"{e.self_cpu_time_total / max(e.count, 1):8.1f}  {e.key[:90]}")
        # Where the slowest single aten calls come from (a long one is usually a host sync).
        slow = sorted((e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                       or e.name in ("aten::index", "aten::nonzero", "aten::item", "aten::_local_scalar_dense")),
                      key=lambda e: -e.cpu_time_total)[:6]
        for e in slow:
            chain, p = [], e.cpu_parent
            while p is not None and len(chain) < 12:
                if not p.name.startswith(("aten::", "autograd::")):
                    chain.append(p.name)
                p = p.cpu_parent
            print(f"  {e.name} {e.cpu_time_total / 1e3:.2f} ms, thread {e.thread}, shapes {e.input_shapes}, "
                  f"children {[c.name for c in e.cpu_children][:6]}, from: " + " <- ".join(chain))


if __name__ == "__main__":
    main()
