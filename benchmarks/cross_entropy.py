"""The LM head and token loss of a grouped step, forward + backward to the hidden states: the
fused cross-entropy (``alto_kernels.cross_entropy``, gradient written over the bf16 logits)
against what the trainer ran before (``F.cross_entropy`` over an fp32 upcast), same process.

Llama-3 8B head (hidden 4096, vocabulary 128256), bf16, random weights. Per token count: the
median time of ``head -> loss -> backward`` (wall clock over 10 synchronised calls, arms alternating) and the peak memory
allocated above the inputs.

    python benchmarks/cross_entropy.py --tokens 4096,16384 --out benchmarks/results/cross_entropy_h100.json

``--smoke``: tiny sizes on the CPU, the kernel under Triton's interpreter, wall-clock time (a check
that the script runs, not a figure).
"""
from __future__ import annotations

import argparse
import json
import shlex
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))


def arm_step(name: str, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, d_loss: torch.Tensor):
    import alto_kernels
    logits = hidden @ head.t()
    if name == "fused":
        loss = alto_kernels.cross_entropy(logits, targets)
    else:
        loss = F.cross_entropy(logits.float(), targets, reduction="none")
    (dh,) = torch.autograd.grad(loss, [hidden], d_loss)
    return loss, dh


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens, args.hidden, args.vocab, args.rounds, args.iters = "16", 32, 300, 2, 2
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        sys.exit("cross_entropy.py times the GPU kernels: it needs a CUDA GPU (or --smoke)")
    cuda = dev.type == "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    head = (torch.randn(args.vocab, args.hidden, device=dev, generator=gen) * args.hidden ** -0.5).to(torch.bfloat16)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "hidden": args.hidden, "vocab": args.vocab, "dtype": "bfloat16", "cases": {}}
    for T in (int(t) for t in args.tokens.split(",")):
        hidden = torch.randn(T, args.hidden, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, args.vocab, (T,), device=dev, generator=gen)
        d_loss = torch.full((T,), 1.0 / T, device=dev)
        arms = ("reference", "fused")
        outs = {a: arm_step(a, hidden, head, targets, d_loss) for a in arms}  # warm-up, autotune
        check = {"loss_rel": ((outs["fused"][0] - outs["reference"][0]).norm() / outs["reference"][0].norm()).item(),
                 "dhidden_rel": ((outs["fused"][1].float() - outs["reference"][1].float()).norm()
                                 / outs["reference"][1].float().norm()).item()}
        del outs
        times = {a: [] for a in arms}
        peaks = {}
        for _ in range(args.rounds):
            for a in arms:
                if cuda:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    arm_step(a, hidden, head, targets, d_loss)
                if cuda:
                    torch.cuda.synchronize()
                times[a].append((time.perf_counter() - t0) * 1e3 / args.iters)
                peaks[a] = max(peaks.get(a, 0), torch.cuda.max_memory_allocated() - base) if cuda else 0
        case = {a: {"median_ms": statistics.median(times[a]), "rounds_ms": [round(t, 3) for t in times[a]],
                    "peak_bytes_above_inputs": peaks[a]} for a in arms}
        case["reference_over_fused"] = case["reference"]["median_ms"] / case["fused"]["median_ms"]
        case["check"] = check
        result["cases"][str(T)] = case
        print(f"T={T} V={args.vocab}: reference {case['reference']['median_ms']:.2f} ms "
              f"(peak +{peaks['reference'] / 2**30:.2f} GiB), fused {case['fused']['median_ms']:.2f} ms "
              f"(peak +{peaks['fused'] / 2**30:.2f} GiB), reference/fused {case['reference_over_fused']:.3f}; "
              f"fused vs reference: loss {check['loss_rel']:.2e}, dHidden {check['dhidden_rel']:.2e}", flush=True)
        del hidden
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
