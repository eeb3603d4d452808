"""Host time of packing one grouped step's batch (``pack_batch``), idle and with the GPU busy.

The 1B engine step is host-bound, and its host profile showed two CPU ``aten::index`` calls in
``pack_batch`` at 3.4-4.6 ms each; CPU indexing on the GPU host took 27 us idle and 0.05-2.2 ms
right after queueing GPU work. This times the packing as it was (torch CPU ops, one pinned
tensor sent per field: ``pack_batch_torch`` below, kept as the baseline) against ``pack_batch``
(numpy, one pinned buffer), alternating, in the same process:

    python benchmarks/pack_host.py [--adapters 8] [--tokens 512] [--rounds 30]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alto_ray.engine.data import IGNORE_INDEX, PackedBatch, pack_batch, to_device, truncated_sequences  # noqa: E402


def pack_batch_torch(parts, pad_id: int, device: torch.device) -> PackedBatch:
    """``pack_batch`` before this change (git 6fcd158), for the comparison only."""
    seqs, seq_ranges, tokens = truncated_sequences(parts)
    width = max(len(ids) for ids, _ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, (ids, lab) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[row, :len(ids)] = 1
    row_layout = [(name, a * width, b * width) for name, a, b in seq_ranges]
    shifted = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    shifted[:, :-1] = labels[:, 1:]
    loss_index = (shifted.view(-1) != IGNORE_INDEX).nonzero().view(-1)
    owner_of_row = torch.empty(n, dtype=torch.long)
    for k, (_, a, b) in enumerate(seq_ranges):
        owner_of_row[a:b] = k
    loss_owner = owner_of_row[loss_index // width]
    label_counts = torch.bincount(loss_owner, minlength=len(seq_ranges)).tolist()
    dev = lambda t: to_device(t, device)  # noqa: E731
    divisor = torch.tensor([max(1, c) for c in label_counts], dtype=torch.float32)
    return PackedBatch(dev(input_ids), dev(mask), labels, row_layout, seq_ranges, tokens,
                       dev(loss_index), dev(shifted.view(-1)[loss_index]), dev(loss_owner), label_counts,
                       dev(divisor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    rng = random.Random(0)
    parts = [(f"a{i}", [([rng.randrange(1000) for _ in range(args.tokens)],
                         [-100] * (args.tokens // 4) + [rng.randrange(1000) for _ in range(args.tokens - args.tokens // 4)])],
              args.tokens) for i in range(args.adapters)]
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    arms = {"torch (before)": pack_batch_torch, "numpy, one buffer (now)": pack_batch}
    for fn in arms.values():  # warm-up, and the two agree
        fn(parts, 0, device)
    one, two = (fn(parts, 0, device) for fn in arms.values())
    for f in ("input_ids", "attention_mask", "loss_index", "loss_targets", "loss_owner", "loss_divisor"):
        assert torch.equal(getattr(one, f), getattr(two, f)), f
    times: dict = {(name, busy): [] for name in arms for busy in (False, True)}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            for busy in (False, True):
                torch.cuda.synchronize()
                if busy:  # ~10 ms of GPU work queued, as in a step whose host runs ahead
                    for _ in range(50):
                        a @ a
                t0 = time.perf_counter()
                fn(parts, 0, device)
                times[(name, busy)].append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    rows = {f"{name}, {'GPU busy' if busy else 'GPU idle'}": {"median_ms": statistics.median(v), "max_ms": max(v)}
            for (name, busy), v in times.items()}
    out = {"device": torch.cuda.get_device_name(0), "adapters": args.adapters, "tokens": args.tokens,
           "rounds": args.rounds, "host_ms": rows,
           "command": f"python benchmarks/pack_host.py --adapters {args.adapters} --tokens {args.tokens} "
                      f"--rounds {args.rounds}" + (f" --out {args.out}" if args.out else "")}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
