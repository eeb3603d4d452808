"""Grouped multi-LoRA engine vs PEFT one adapter at a time: tokens/s and MFU, no Ray.

Arms, per model shape (Llama-3.2-1B / Llama-3.1-8B configs, random bf16 weights built on the GPU):
  peft     one r16 LoRA adapter (all 7 projections), torch AdamW, 1×512 tokens per step; training
           K adapters this way is K such runs back to back, so its tokens/s is the sequential rate.
  engine   GroupedTrainer with K=8 r16 adapters × 1×512 tokens each: one packed fwd+bwd per step.
Both: sdpa attention, gradient checkpointing off, LoRA dropout --dropout, warm-up steps, then the
median of timed steps (cuda-synchronised). MFU = 4 · params · tokens/s / measured bf16 matmul rate
(an 8192³ matmul timed in the same run). On CUDA the 8b figures are merged into summary.json.

    python benchmarks/engine.py --shapes 1b,8b --out benchmarks/results/engine_h100.json
    python benchmarks/engine.py --smoke            # tiny shapes, CPU is fine: checks the plumbing
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

SHAPES: Dict[str, Dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, max_position_embeddings=8192),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
                  max_position_embeddings=256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SUMMARY = Path(__file__).resolve().parent / "results" / "summary.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (FLOP/s) at n³ in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_steps(lambda: a @ b, device, warmup=3, iters=20 if device.type == "cuda" else 3)
    return 2.0 * n ** 3 / seconds


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random weights built directly on ``device`` in ``dtype`` (no CPU init, no save/load)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], attention_dropout=0.0, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def random_examples(n: int, seq: int, vocab: int, seed: int) -> List[tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        out.append((ids, list(ids)))
    return out


def run_peft(shape: str, device: torch.device, dtype: torch.dtype, seq: int, rank: int, dropout: float,
             warmup: int, iters: int) -> Dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_backbone(shape, device, dtype),
                           LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = SHAPES[shape]["vocab_size"]
    batches = [torch.tensor([ex[0]], device=device) for ex in random_examples(4, seq, vocab, seed=1)]
    state = {"i": 0}

    def step() -> None:
        ids = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_seconds": seconds, "tokens_per_step": seq, "tokens_per_s": seq / seconds,
            "peak_bytes": peak}


def run_engine(shape: str, device: torch.device, dtype: torch.dtype, seq: int, rank: int, dropout: float,
               adapters: int, warmup: int, iters: int) -> Dict[str, Any]:
    import alto_kernels
    from alto_ray.engine import AdapterConfig, GroupedTrainer, TaskData

    vocab = SHAPES[shape]["vocab_size"]
    data = TaskData.from_examples(random_examples(64, seq, vocab, seed=1))
    trainer = GroupedTrainer(build_backbone(shape, device, dtype), data, device=device, backend="auto")
    for i in range(adapters):
        trainer.add_adapter(f"a{i}", AdapterConfig(rank=rank, alpha=2 * rank, dropout=dropout, lr=1e-4 * (i + 1),
                                                   batch_size=1, max_seq_len=seq, max_steps=10_000, seed=i,
                                                   lr_schedule="constant", max_grad_norm=1.0))
    probe = torch.empty(1, 1, device=device, dtype=dtype)
    losses: Dict[str, float] = {}
    first: Dict[str, float] = {}

    def step() -> None:
        losses.update({k: r.loss for k, r in trainer.step().items()})
        if not first:
            first.update(losses)

    seconds = time_steps(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = adapters * seq
    aligns: Dict[str, int] = {}  # the LoRA plans' ALIGN (alto_kernels.plan.table_align): 8 = vectorised
    for module in trainer.model.modules():
        for plan in getattr(module, "_plans", {}).values():
            a = str(getattr(plan, "table_align", None))
            aligns[a] = aligns.get(a, 0) + 1
    out = {"lora_plans_by_align": aligns, "fused_norms": trainer.model.fused_norms, "fused_mlps": trainer.model.fused_mlps,
           "fused_rotary": trainer.model.fused_rotary, "step_seconds": seconds, "tokens_per_step": tokens,
           "tokens_per_s": tokens / seconds,
           "adapters": adapters, "peak_bytes": peak, "backend": alto_kernels.resolve_backend(probe, "auto"),
           "all_losses_finite": all(v == v and abs(v) != float("inf") for v in losses.values()),
           # per adapter, to compare arms of one run (same weights, data and seeds): the first
           # step's loss and the last one's, after warmup + iters optimizer steps
           "first_losses": {k: round(v, 5) for k, v in first.items()},
           "last_losses": {k: round(v, 5) for k, v in losses.items()}}
    return out


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "missing"
    return out


def merge_summary(path: Path, entries: Dict[str, Dict[str, Any]]) -> None:
    """Merge our keys into summary.json without touching anyone else's."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,8b", help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--summary", type=Path, default=SUMMARY, help="summary.json (merged only on CUDA)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps; runs on CPU")
    ap.add_argument("--eager-ops-too", action="store_true",
                    help="also time the engine with the backbone's own RMSNorms, MLP activations, rotary and "
                         "linears (ALTO_FUSED_NORM=0 ALTO_FUSED_MLP=0 ALTO_FUSED_ROPE=0 ALTO_FUSED_LINEAR=0), same run")
    ap.add_argument("--off", action="append", default=[], metavar="VAR[,VAR]",
                    help="also time the engine with these switches at 0 (e.g. ALTO_FUSED_ROPE), same run; repeatable")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shapes, args.seq, args.warmup, args.iters = ["smoke"], min(args.seq, 64), 1, 2
    else:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    flops = matmul_flops(device, 8192 if device.type == "cuda" else 512, dtype)
    result: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "versions": versions(), "command": command, "dtype": str(dtype).replace("torch.", ""),
        "matmul_flops": flops, "adapters": args.adapters, "seq": args.seq, "rank": args.rank,
        "dropout": args.dropout, "warmup": args.warmup, "iters": args.iters, "shapes": {}}
    for shape in shapes:
        n_params = sum(p.numel() for p in build_backbone(shape, torch.device("meta"), dtype).parameters())
        peft_res = run_peft(shape, device, dtype, args.seq, args.rank, args.dropout, args.warmup, args.iters)
        _free(device)
        eng_res = run_engine(shape, device, dtype, args.seq, args.rank, args.dropout, args.adapters,
                             args.warmup, args.iters)
        _free(device)
        arms = {}
        if args.eager_ops_too:
            arms["engine_eager_ops"] = ("ALTO_FUSED_NORM", "ALTO_FUSED_MLP", "ALTO_FUSED_ROPE", "ALTO_FUSED_LINEAR")
        for spec in args.off:
            off = tuple(v.strip() for v in spec.split(",") if v.strip())
            arms["engine_off_" + "_".join(v.replace("ALTO_", "").lower() for v in off)] = off
        arm_res = {name: _with_env_off(off, lambda: run_engine(shape, device, dtype, args.seq, args.rank, args.dropout,
                                                               args.adapters, args.warmup, args.iters), device)
                   for name, off in arms.items()}
        mfu = lambda tps: 4.0 * n_params * tps / flops
        result["shapes"][shape] = {
            "params": n_params, "peft_sequential": {**peft_res, "mfu": mfu(peft_res["tokens_per_s"])},
            "engine": {**eng_res, "mfu": mfu(eng_res["tokens_per_s"])},
            "speedup_vs_peft_sequential": eng_res["tokens_per_s"] / peft_res["tokens_per_s"]}
        s = result["shapes"][shape]
        for name, res in arm_res.items():
            s[name] = {**res, "mfu": mfu(res["tokens_per_s"])}
            print(f"[{shape}] {name} ({', '.join(arms[name])} = 0): {res['tokens_per_s']:.0f} tok/s, "
                  f"step {res['step_seconds'] * 1e3:.1f} ms", flush=True)
        print(f"[{shape}] peft {peft_res['tokens_per_s']:.0f} tok/s (MFU {s['peft_sequential']['mfu']:.1%}) | "
              f"engine {eng_res['tokens_per_s']:.0f} tok/s (MFU {s['engine']['mfu']:.1%}, {eng_res['backend']}) | "
              f"speedup {s['speedup_vs_peft_sequential']:.2f}x", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if device.type == "cuda" and "8b" in result["shapes"]:
        s8 = result["shapes"]["8b"]
        merge_summary(args.summary, {
            "engine.speedup_vs_peft_sequential_8b": {"value": s8["speedup_vs_peft_sequential"],
                                                     "device": result["device"], "command": command},
            "engine.mfu_8b": {"value": s8["engine"]["mfu"], "device": result["device"], "command": command}})
    return result


def _with_env_off(variables: Sequence[str], run: Callable[[], Dict[str, Any]], device: torch.device) -> Dict[str, Any]:
    """``run()`` with each of ``variables`` set to 0, then restored."""
    saved = {v: os.environ.get(v) for v in variables}
    os.environ.update({v: "0" for v in variables})
    try:
        return run()
    finally:
        for v, value in saved.items():
            if value is None:
                os.environ.pop(v)
            else:
                os.environ[v] = value
        _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
