"""Rank-local adapter parallelism vs FSDP data parallelism of each adapter: tokens/s on N GPUs.

One FSDP2-sharded frozen backbone (Llama-3.1-8B shape, random bf16 weights built on the meta
device and materialised shard by shard on each GPU: no rank ever holds the full 16 GB), K=8 r16
LoRA adapters (all 7 projections), 1x512 tokens per adapter per step. Two ways to train them:

  ranklocal  each rank owns K/N adapters and trains them together in one packed grouped step on
             its own batches (``RankLocalTrainer``); the ranks only all-gather the frozen shards,
             no gradient crosses ranks. tokens/s = tokens of all ranks / step time (the slowest
             rank's, per step).
  fsdp       the standard data-parallel recipe, one adapter at a time: every rank runs the same
             adapter on its own 1x512 micro-batch (global batch N x 512; ``--fsdp-batch split``
             gives each rank 512/N tokens instead, a global batch of 1x512), LoRA weights
             replicated and their gradients all-reduced (averaged) before the optimizer step, as
             DDP / FSDP do for parameters this small; the K adapters are trained in turn.
             tokens/s = tokens of all K adapter-steps on all ranks / time of the K steps.
Same backbone, same sharding (every decoder layer + head + decoder root, reshard after forward),
same engine (``GroupedTrainer``), sdpa attention, no gradient checkpointing, LoRA dropout 0.
Warm-up steps, then the median of timed steps (cuda-synchronised, barrier before each).

    torchrun --nproc_per_node 2 benchmarks/multigpu.py --out benchmarks/results/multigpu_h200x2.json \\
        --summary benchmarks/results/summary.json
    torchrun --nproc_per_node 2 benchmarks/multigpu.py --smoke    # CPU + gloo, tiny shape: the plumbing
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Iterator, List  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alto_ray.cluster.ranklocal import RankLocalTrainer, count_collectives  # noqa: E402
from alto_ray.cluster.ranklocal_model import build_random_sharded_backbone, local_shard_numel  # noqa: E402
from alto_ray.engine import AdapterConfig, TaskData  # noqa: E402


def _engine_shapes() -> Dict[str, Dict[str, Any]]:
    """The model shapes of benchmarks/engine.py (one definition of "Llama-8B shape")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_alto_bench_engine", Path(__file__).resolve().parent / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHAPES


SHAPES = _engine_shapes()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, warmup: int, iters: int) -> List[float]:
    """Seconds per call of ``fn`` (collective: every rank), each the slowest rank's."""
    for _ in range(warmup):
        fn()
    out: List[float] = []
    for _ in range(iters):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        out.append(float(dt.item()))
    return out


def random_data(n: int, seq: int, vocab: int, seed: int) -> TaskData:
    """Full-length random token sequences (no padding), every token a label."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (seq,), generator=gen).tolist()
        examples.append((ids, list(ids)))
    return TaskData.from_examples(examples, pad_id=0)


def adapter_cfg(rank_r: int, seq: int, seed: int) -> AdapterConfig:
    return AdapterConfig(rank=rank_r, alpha=2 * rank_r, dropout=0.0, lr=1e-4, batch_size=1, max_seq_len=seq,
                         max_steps=10_000, lr_schedule="constant", seed=seed)


@contextmanager
def only(trainer: RankLocalTrainer, name: str) -> Iterator[None]:
    """Step one adapter of the trainer (the engine steps all of them): benchmark-only, it swaps
    the trainer's private run table for the duration of the block."""
    runs = trainer.trainer._runs
    trainer.trainer._runs = {name: runs[name]}
    try:
        yield
    finally:
        trainer.trainer._runs = runs


def average_grad_hook(world: int, names: List[str]) -> Any:
    """DDP semantics for a replicated LoRA master: its gradient is the mean over ranks (the
    engine's grad_hook: on a GPU the fused kernels write master.grad without autograd hooks)."""
    wanted = set(names)

    def hook(name: str, grad: torch.Tensor) -> None:
        if name in wanted:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
            grad.div_(world)
    return hook


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def run(args: argparse.Namespace) -> Dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    from transformers import AutoConfig

    shape = "smoke" if args.smoke else args.shape
    config = AutoConfig.for_model("llama", **SHAPES[shape])
    t0 = time.perf_counter()
    backbone = build_random_sharded_backbone(config, device, dtype, seed=args.seed)
    build_s = time.perf_counter() - t0
    if args.adapters % world:
        raise SystemExit(f"--adapters {args.adapters} must be a multiple of the {world} ranks")
    per_rank = args.adapters // world
    fsdp_seq = args.seq_len if args.fsdp_batch == "per-rank" else args.seq_len // world
    data = random_data(64, args.seq_len, config.vocab_size, seed=args.seed * 100 + rank)
    trainer = RankLocalTrainer(backbone, data, device=device, dtype=dtype)

    # (A) rank-local: this rank's K/N adapters, one packed step.
    for i in range(per_rank):
        trainer.add_adapter(f"rl{rank}_{i}", adapter_cfg(args.lora_rank, args.seq_len, seed=rank * per_rank + i))
    tok = {}

    def rl_step() -> None:
        res = trainer.step(micro_steps=1)
        tok["rl"] = sum(r.tokens for r in res.values())
        tok["rl_loss"] = [r.loss for r in res.values()]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rl_times = timed(rl_step, device, args.warmup, args.steps)
    rl_peak = peak_gib(device)
    with count_collectives() as rl_collectives:  # evidence on NCCL: all-gathers only, no reduction
        rl_step()
    sync(device)
    rl_tokens = torch.tensor([tok["rl"]], dtype=torch.float64, device=device if args.cuda else "cpu")
    dist.all_reduce(rl_tokens)
    rl_tps = float(rl_tokens.item()) / statistics.median(rl_times)
    for name in list(trainer.adapter_names):
        trainer.remove_adapter(name)

    # (B) FSDP data parallelism, one adapter at a time: same names, seeds, init on every rank.
    names = [f"dp{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        trainer.add_adapter(name, adapter_cfg(args.lora_rank, fsdp_seq, seed=1000 + i))

    trainer.trainer.grad_hook = average_grad_hook(world, names)

    def dp_round() -> None:
        n = 0
        for name in names:
            with only(trainer, name):
                res = trainer.step(micro_steps=1)[name]
                n += res.tokens
        tok["dp"], tok["dp_loss"] = n, res.loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dp_times = timed(dp_round, device, max(1, args.warmup // 2), max(2, args.steps // 2))
    dp_peak = peak_gib(device)
    dp_tokens = torch.tensor([tok["dp"]], dtype=torch.float64, device=device if args.cuda else "cpu")
    dist.all_reduce(dp_tokens)
    dp_tps = float(dp_tokens.item()) / statistics.median(dp_times)
    replicated = _replicas_agree(trainer, names[0], device)

    return {
        "device": (f"{world}x {torch.cuda.get_device_name(device)}" if args.cuda else f"{world}x CPU (gloo)"),
        "torch_version": torch.__version__,
        "world_size": world, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "adapters": args.adapters, "lora_rank": args.lora_rank, "seq_len": args.seq_len,
        "fsdp_batch": args.fsdp_batch, "fsdp_tokens_per_rank_per_step": fsdp_seq,
        "tokens_per_s": {"ranklocal": rl_tps, "fsdp": dp_tps},
        "ratio": rl_tps / dp_tps,
        "ranklocal_step_s": statistics.median(rl_times), "ranklocal_step_s_all": rl_times,
        "fsdp_round_s": statistics.median(dp_times), "fsdp_round_s_all": dp_times,
        "tokens_per_step": {"ranklocal": float(rl_tokens.item()), "fsdp_round": float(dp_tokens.item())},
        "peak_gib_rank0": {"ranklocal": rl_peak, "fsdp": dp_peak},
        "shard_numel_rank0": local_shard_numel(backbone), "build_s": build_s,
        "ranklocal_collectives_per_step_rank0": {k: v for k, v in rl_collectives.items() if v},
        "fsdp_replicas_agree": replicated, "last_loss_rank0": {"ranklocal": tok["rl_loss"], "fsdp": tok["dp_loss"]},
        "loss_at_init_expected": math.log(config.vocab_size), "padding_micro_steps": trainer.padding_micro_steps,
    }


def _replicas_agree(trainer: RankLocalTrainer, name: str, device: torch.device) -> bool:
    """The FSDP arm really is data parallel: its replicated adapter is identical on every rank."""
    w = trainer.trainer.model.adapters[name].master.detach().float()
    ref = w.clone()
    dist.broadcast(ref, src=0)
    ok = torch.tensor([float(torch.equal(w, ref))], device=w.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def merge_summary(path: Path, entries: Dict[str, Dict[str, Any]]) -> None:
    """Merge our keys into summary.json without touching anyone else's."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(res: Dict[str, Any]) -> None:
    print(f"\n{res['device']}, torch {res['torch_version']}, {res['shape']} {res['dtype']}, "
          f"{res['adapters']} adapters r{res['lora_rank']} x 1x{res['seq_len']} tokens")
    print(f"{'arm':<10} {'tokens/s':>12} {'time s':>9} {'tokens':>8} {'peak GiB':>9}")
    print(f"{'ranklocal':<10} {res['tokens_per_s']['ranklocal']:>12.0f} {res['ranklocal_step_s']:>9.4f} "
          f"{res['tokens_per_step']['ranklocal']:>8.0f} {res['peak_gib_rank0']['ranklocal']:>9.1f}")
    print(f"{'fsdp':<10} {res['tokens_per_s']['fsdp']:>12.0f} {res['fsdp_round_s']:>9.4f} "
          f"{res['tokens_per_step']['fsdp_round']:>8.0f} {res['peak_gib_rank0']['fsdp']:>9.1f}")
    print(f"ranklocal / fsdp = {res['ratio']:.2f}x  (target >= 1.5x)")


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON result file (rank 0 writes it)")
    ap.add_argument("--summary", type=Path, default=None, help="summary.json to merge multigpu.* into")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU + gloo (no GPU needed)")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--fsdp-batch", default="per-rank", choices=["per-rank", "split"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.seq_len, args.lora_rank = min(args.seq_len, 32), min(args.lora_rank, 4)
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    world = int(os.environ.get("WORLD_SIZE", 1))
    command = (f"torchrun --nproc_per_node {world} benchmarks/multigpu.py "
               + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    backend = "nccl" if args.cuda else "gloo"
    if args.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    else:
        dist.init_process_group(backend)
    try:
        res = run(args)
        res["command"] = command
        if dist.get_rank() == 0:
            print_table(res)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(res, indent=2) + "\n")
            if args.summary:
                merge_summary(args.summary, {"multigpu.ranklocal_over_fsdp": {
                    "value": res["ratio"], "device": res["device"], "command": command}})
        return res
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
