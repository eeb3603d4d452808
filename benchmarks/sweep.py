"""One LoRA sweep, three ways, on one GPU: alto-ray vs Ray Tune + PEFT (ASHA) vs Ray Tune + PEFT (full).

    python benchmarks/sweep.py --arm alto --out $OUT/sweep_alto.json
    python benchmarks/sweep.py --arm asha --out $OUT/sweep_asha.json
    python benchmarks/sweep.py --arm full --out $OUT/sweep_full.json [--configs 0-7]
    python benchmarks/sweep.py --summarize benchmarks/results/sweep_*.json --summary benchmarks/results/summary.json

Every arm tunes the same 16 configurations (rank, alpha, lr, batch size drawn once from a fixed
seed) of a Llama-1B-shaped model with random bf16 weights, 200 steps of 1–4 sequences × 512
tokens, on a synthetic arithmetic dataset with learnable structure that the script writes. The
baselines are what a team would run without alto-ray: a plain function trainable that loads the
model, wraps it with PEFT and trains one adapter per GPU; (b) under ASHA, (c) to the end. Each
arm reports wall time of ``Tuner.fit`` (model loads included: they are part of the cost of one
trial per GPU), GPU-seconds, tokens trained, and the best final eval loss it finds; all arms
evaluate on the same held-out split through the same loss (mean next-token loss).
``--configs`` runs a slice of the grid, so the slow full arm can be split over several device
calls; ``--summarize`` adds slices of one arm up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MAX_STEPS = 200
SEQ_LEN = 512
EVAL_EVERY = 50
STEPS_PER_REPORT = 5  # alto arm; the baselines report every step (one trial at a time)
EVAL_SIZE = 32
WARMUP = 10
NUM_CONFIGS = 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sweep_configs(n: int = NUM_CONFIGS, seed: int = 20261122) -> List[Dict[str, Any]]:
    """The issue's search space, sampled once so every arm tunes the same trials."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append({"rank": rng.choice([8, 16, 32, 64]), "alpha": rng.choice([16, 32]),
                    "lr": round(10 ** rng.uniform(-5, -3), 8), "batch_size": rng.choice([1, 2, 4]),
                    "dropout": 0.05, "seed": i})
    return out


# --------------------------------------------------------------------------- workload
def llama_1b_config(smoke: bool = False):
    from transformers import LlamaConfig
    if smoke:  # a CPU check of the plumbing, not a benchmark
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def arithmetic_text(rng: random.Random, target_tokens: int) -> str:
    """Templated arithmetic: the answer is a function of the prompt, so loss can keep falling."""
    parts, n = [], 0
    while n < target_tokens:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        c = {"+": a + b, "-": a - b, "*": a * b}[op]
        line = f"{' '.join(str(a))} {op} {' '.join(str(b))} = {' '.join(str(c))} ;"
        parts.append(line)
        n += len(line.split())
    return " ".join(parts)


def build_workdir(root: str, n_records: int = 600, smoke: bool = False) -> Dict[str, str]:
    """Model (random bf16 Llama-1B shape), a word-level tokenizer, and the dataset, on disk."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model_dir, data_path = os.path.join(root, "model"), os.path.join(root, "arith.jsonl")
    if os.path.exists(os.path.join(model_dir, "config.json")) and os.path.exists(data_path):
        return {"model": model_dir, "data": data_path}
    os.makedirs(model_dir, exist_ok=True)
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [str(d) for d in range(10)] + ["+", "-", "*", "=", ";"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(model_dir)
    cfg = llama_1b_config(smoke)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    rng = random.Random(0)
    with open(data_path, "w") as f:
        for _ in range(n_records):
            f.write(json.dumps({"text": arithmetic_text(rng, SEQ_LEN - 8)}) + "\n")
    return {"model": model_dir, "data": data_path}


# --------------------------------------------------------------------------- baselines
def peft_trainable(config: Dict[str, Any]) -> None:
    """What a team runs without alto-ray: one model, one PEFT adapter, one GPU per trial."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import tune
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from alto_ray.engine.data import AdapterStream, DatasetSpec, TaskData, load_records

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    data = TaskData(load_records(DatasetSpec(config["data"], eval_size=EVAL_SIZE)),
                    DatasetSpec(config["data"], eval_size=EVAL_SIZE), tokenizer)
    # Straight onto the GPU when accelerate is there (as alto-ray's loader does): a fair baseline
    # pays for one load per trial, not for a CPU detour.
    import importlib.util
    kw = {"device_map": {"": device}} if device == "cuda" and importlib.util.find_spec("accelerate") else {}
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=dtype, **kw).to(device)
    model = get_peft_model(model, LoraConfig(r=config["rank"], lora_alpha=config["alpha"],
                                             lora_dropout=config["dropout"], target_modules=TARGET_MODULES,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, config["max_steps"])
    stream = AdapterStream(len(data.train_examples), seed=config["seed"])

    def batch(examples):
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((len(examples), width), data.pad_id, dtype=torch.long)
        lab = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for r, (i, l) in enumerate(examples):
            ids[r, :len(i)], lab[r, :len(l)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(l), 1
        return ids.to(device), mask.to(device), lab.to(device)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        for k in range(0, len(data.eval_examples), 8):
            ids, mask, lab = batch([(i[:SEQ_LEN], l[:SEQ_LEN]) for i, l in data.eval_examples[k:k + 8]])
            n = int((lab[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=lab).loss) * n
            count += n
        model.train()
        return total / max(count, 1)

    model.train()
    tokens = 0
    for step in range(1, config["max_steps"] + 1):
        examples = [data.train_examples[i] for i in stream.take(config["batch_size"])]
        ids, mask, lab = batch([(i[:SEQ_LEN], l[:SEQ_LEN]) for i, l in examples])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        metrics = {"loss": float(loss), "step": step, "tokens": tokens}
        if step % EVAL_EVERY == 0 or step == config["max_steps"]:
            metrics["eval_loss"] = evaluate()
        tune.report(metrics)


def param_space(paths: Dict[str, str], indices: List[int]) -> Dict[str, Any]:
    from ray import tune
    configs = sweep_configs()
    space: Dict[str, Any] = {"idx": tune.grid_search(indices)}
    for key in configs[0]:
        space[key] = tune.sample_from(lambda spec, key=key: configs[spec.config.idx][key])
    return space


def run_arm(arm: str, indices: List[int], paths: Dict[str, str], storage: str,
            time_budget_s: Optional[float] = None, reuse_actors: bool = False) -> Dict[str, Any]:
    import ray
    import torch
    from ray import tune

    space = param_space(paths, indices)
    gpus = torch.cuda.device_count()
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    if arm == "alto":
        from alto_ray import AltoScheduler, LoRATask, lora_trainable
        # One Tune result per STEPS_PER_REPORT engine steps (loss: their mean): 16 trials
        # reporting every step cost the Tune driver more than the grouped step itself. The
        # scheduler then counts in steps (time_attr="step"), as AltoScheduler's docstring says.
        # Checkpoints (adapter + optimizer state, ~0.7 GB for a rank-64 adapter of this model)
        # only at the end: the baselines keep none at all, so mid-run ones would be a cost
        # only this arm pays (they took ~5 s per round of 4 adapters on the H100).
        task = LoRATask(model=paths["model"], dataset=paths["data"], max_steps=MAX_STEPS,
                        eval_every=EVAL_EVERY, eval_size=EVAL_SIZE, max_seq_len=SEQ_LEN,
                        warmup_steps=WARMUP, steps_per_report=STEPS_PER_REPORT, name="sweep",
                        checkpoint_every=MAX_STEPS)
        trainable, scheduler, max_conc = lora_trainable(task), AltoScheduler(time_attr="step"), 0
    else:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        space.update({"model": paths["model"], "data": paths["data"], "max_steps": MAX_STEPS})
        trainable = tune.with_resources(peft_trainable, {"cpu": 1, "gpu": 1 if gpus else 0})
        scheduler = (ASHAScheduler(time_attr="step", max_t=MAX_STEPS, grace_period=max(1, MAX_STEPS // 8), reduction_factor=3)
                     if arm == "asha" else FIFOScheduler())
        max_conc = 1  # one trial per GPU, and this machine has one
    # Tune checkpoints every trial it stops (checkpoint_at_end defaults to on for class
    # trainables), losers included. The baselines keep no checkpoints, so the alto arm turns that
    # off; its survivors still save their final adapter (the trainable asks for it when done).
    checkpoint_config = tune.CheckpointConfig(checkpoint_at_end=False) if arm == "alto" else None
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                                   max_concurrent_trials=max_conc or None,
                                                   time_budget_s=time_budget_s, reuse_actors=reuse_actors),
                       run_config=tune.RunConfig(storage_path=storage, name=f"sweep_{arm}", verbose=1,
                                                 checkpoint_config=checkpoint_config))
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials = []
    for res in grid:
        df = res.metrics_dataframe
        evals = df["eval_loss"].dropna() if df is not None and "eval_loss" in df else []
        trials.append({"idx": res.config.get("idx"), "config": {k: res.config.get(k) for k in sweep_configs()[0]},
                       "steps": int(res.metrics.get("step", 0) or 0), "tokens": int(res.metrics.get("tokens", 0) or 0),
                       "final_eval_loss": float(evals.iloc[-1]) if len(evals) else None,
                       "error": str(res.error) if res.error else None,
                       "stop_reason": res.metrics.get("alto_decision"),
                       "timing": timing_rows(df) if arm == "alto" else None})
    ray.shutdown()
    finals = [t["final_eval_loss"] for t in trials if t["final_eval_loss"] is not None and math.isfinite(t["final_eval_loss"])]
    complete = all(t["error"] is None and (t["steps"] >= MAX_STEPS or t["stop_reason"] or arm == "asha")
                   for t in trials) and not (time_budget_s and wall >= time_budget_s)
    return {"arm": arm, "indices": indices, "wall_s": wall, "complete": complete, "gpu_seconds": wall * max(gpus, 1) if gpus else None,
            "tokens": sum(t["tokens"] for t in trials), "best_eval_loss": min(finals) if finals else None,
            "trials": trials}


TIMING_COLUMNS = ("step", "timestamp", "time_this_iter_s", "time_in_group_s", "group_idle_s", "group_lock_wait_s",
                  "group_engine_s", "group_eval_s", "alto_active")


def timing_rows(df: Any) -> Optional[List[List[Any]]]:
    """Per report of a trial: where its time went (engine vs the group waiting for trials)."""
    if df is None or "step" not in df:
        return None
    cols = [c for c in TIMING_COLUMNS if c in df]
    return [[c for c in cols]] + [[None if v != v else (round(float(v), 4) if isinstance(v, float) else int(v))
                                    for v in row] for row in df[cols].itertuples(index=False)]


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def parse_indices(text: Optional[str]) -> List[int]:
    if not text:
        return list(range(NUM_CONFIGS))
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def summarize(paths: List[str], summary_path: Optional[str], lower_bound_arms: Sequence[str] = ()) -> Dict[str, Any]:
    """Adds the slices of each arm up (wall time of sequential slices is additive) and derives the figures.

    An arm named in ``lower_bound_arms`` may be incomplete (stopped by its time budget): its wall
    time is then a lower bound, and so is its ratio over alto (marked so in the summary)."""
    arms: Dict[str, Dict[str, Any]] = {}
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        a = arms.setdefault(r["arm"], {"wall_s": 0.0, "gpu_seconds": 0.0, "tokens": 0, "best_eval_loss": math.inf,
                                       "indices": [], "device": r["device"], "commands": []})
        a["wall_s"] += r["wall_s"]
        a["gpu_seconds"] += r["gpu_seconds"] or 0.0
        a["tokens"] += r["tokens"]
        a["indices"] += r["indices"]
        a["commands"].append(r["command"])
        if r["best_eval_loss"] is not None:
            a["best_eval_loss"] = min(a["best_eval_loss"], r["best_eval_loss"])
    bounds = set()
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if not r.get("complete", True):
            if r["arm"] not in lower_bound_arms:
                raise SystemExit(f"{p}: the arm did not complete (time budget or trial errors)")
            bounds.add(r["arm"])
    for name, a in arms.items():
        if sorted(a["indices"]) != list(range(NUM_CONFIGS)):
            raise SystemExit(f"arm {name} covers configs {sorted(a['indices'])}, not all {NUM_CONFIGS}")
    out: Dict[str, Any] = {"arms": arms, "lower_bound_arms": sorted(bounds)}
    if {"alto", "asha", "full"} <= set(arms):
        out["full_over_alto"] = arms["full"]["wall_s"] / arms["alto"]["wall_s"]
        out["asha_over_alto"] = arms["asha"]["wall_s"] / arms["alto"]["wall_s"]
        out["best_loss_rel_gap"] = arms["alto"]["best_eval_loss"] / arms["full"]["best_eval_loss"] - 1
        if summary_path:
            summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
            cmd = " && ".join(c for a in ("alto", "asha", "full") for c in arms[a]["commands"])
            for key in ("full_over_alto", "asha_over_alto", "best_loss_rel_gap"):
                summary[f"sweep.{key}"] = {"value": round(out[key], 4), "device": arms["alto"]["device"], "command": cmd}
                arm = key.split("_over_")[0]
                if arm in bounds:
                    summary[f"sweep.{key}"]["lower_bound"] = True
                    summary[f"sweep.{key}"]["note"] = (f"the {arm} arm hit its time budget before every trial ran: "
                                                       "its wall time, and this ratio, are lower bounds")
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2, sort_keys=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arm", choices=["alto", "asha", "full"])
    ap.add_argument("--configs", help="slice of the 16 configs, e.g. 0-7")
    ap.add_argument("--workdir", default="/tmp/alto_sweep")
    ap.add_argument("--out")
    ap.add_argument("--summarize", nargs="*")
    ap.add_argument("--summary")
    ap.add_argument("--lower-bound", nargs="*", default=[], metavar="ARM",
                    help="with --summarize: accept these arms incomplete, their ratios as lower bounds")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the plumbing on a CPU")
    ap.add_argument("--reuse-actors", action="store_true",
                    help="baselines: keep each trial's worker process for the next trial (Tune's reuse_actors): "
                         "saves the imports and CUDA start of every trial, not its model load")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="stop the arm after this many seconds (a guard; the result is then marked incomplete)")
    args = ap.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize, args.summary, args.lower_bound), indent=2, default=str))
        return
    global MAX_STEPS, EVAL_EVERY, SEQ_LEN, STEPS_PER_REPORT
    if args.smoke:
        MAX_STEPS, EVAL_EVERY, SEQ_LEN, STEPS_PER_REPORT = 6, 3, 64, 2
    paths = build_workdir(args.workdir, n_records=100 if args.smoke else 600, smoke=args.smoke)
    result = run_arm(args.arm, parse_indices(args.configs), paths, os.path.join(args.workdir, "ray_results"),
                     args.time_budget, args.reuse_actors)
    result.update({"device": device_name(), "command": "python " + " ".join(sys.argv),
                   "shape": "Llama-1B (hidden 2048, 16 layers, vocab 128256), bf16 random weights",
                   "max_steps": MAX_STEPS, "seq_len": SEQ_LEN, "reuse_actors": args.reuse_actors,
                   "steps_per_report": STEPS_PER_REPORT if args.arm == "alto" else 1,
                   "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()})
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=2, default=str))


if __name__ == "__main__":
    main()
