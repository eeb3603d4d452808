"""Rank-local groups through Ray Tune on real GPUs: a check, not a speed benchmark.

    python benchmarks/ranklocal_tune.py --out $OUT/ranklocal_tune.json     # a 2-GPU machine

Tunes 4 trials of a Llama-1B-shaped model (random bf16 weights) with
``LoRATask(gpus_per_group=2)``: one group whose backbone is FSDP2-sharded over 2 GPUs (NCCL),
each adapter on one rank. Then, with the GPUs free again, trains the same 4 adapters in one
process on one GPU (``GroupedTrainer``) and compares the per-step losses: dropout 0, so only
bf16 rounding of the sharded vs unsharded backbone separates them. Exits 1 if a trial failed,
a loss is not finite or the curves disagree beyond ``--tol``; writes wall time, tokens/s and the
largest relative loss gap to ``--out``.

    python benchmarks/ranklocal_tune.py --ranks 1 --out $OUT/ranklocal_one_gpu.json   # any GPU machine

``--ranks 1`` checks the same Ray-actor path where only one GPU is lent: a ``RankLocalGroup`` of
one rank (a NCCL world of one, the backbone through ``fully_shard``, each step a lock-step call
into the actor) against ``GroupedTrainer`` on the same GPU, then exports an adapter and loads it
with ``PeftModel.from_pretrained``. Everything but traffic between ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

CONFIGS = [{"rank": 8, "lr": 3e-4}, {"rank": 16, "lr": 1e-4}, {"rank": 32, "lr": 5e-4}, {"rank": 64, "lr": 2e-4}]
COMMON = {"alpha": 16, "batch_size": 2, "dropout": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", default="/tmp/alto_ranklocal")
    ap.add_argument("--tol", type=float, default=0.03)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 gloo ranks on CPU: checks the script")
    ap.add_argument("--ranks", type=int, default=2, choices=(1, 2),
                    help="1: one rank of the Ray-actor path without Tune (one GPU suffices)")
    args = ap.parse_args()
    if args.ranks == 1:
        sys.exit(one_rank(args))

    import ray
    import torch
    from ray import tune

    from alto_ray import LoRATask, lora_trainable
    from sweep import SEQ_LEN, build_workdir

    paths = build_workdir(args.workdir, n_records=300, smoke=args.smoke)
    ray.init(include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 2 and not args.smoke:
        raise SystemExit(f"needs 2 GPUs, Ray sees {gpus}")
    device = "cpu" if args.smoke else "cuda"
    task = LoRATask(model=paths["model"], dataset=paths["data"], max_steps=args.steps, eval_every=args.steps,
                    eval_size=16, max_seq_len=SEQ_LEN, name="ranklocal-gpu", gpus_per_group=2,
                    num_groups=1, steps_per_report=5, device=device)
    rows: dict = {}

    class Record(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            rows.setdefault(trial.config["rank"], []).append(
                {"step": result["step"], "loss": result["loss"], "tokens": result["tokens"],
                 "engine_s": result.get("group_engine_s"), "group": result["alto_group"]})

    t0 = time.perf_counter()
    grid = tune.Tuner(lora_trainable(task),
                      param_space={**COMMON, "rank": tune.grid_search([c["rank"] for c in CONFIGS]),
                                   "lr": tune.sample_from(lambda s: {c["rank"]: c["lr"] for c in CONFIGS}[s.config.rank])},
                      tune_config=tune.TuneConfig(metric="loss", mode="min"),
                      run_config=tune.RunConfig(name="ranklocal", storage_path=os.path.join(args.workdir, "ray"),
                                                verbose=1, callbacks=[Record()])).fit()
    wall = time.perf_counter() - t0
    errors = [str(r.error) for r in grid if r.error]
    finals = {r.config["rank"]: {"step": r.metrics.get("step"), "loss": r.metrics.get("loss"),
                                 "tokens": r.metrics.get("tokens"), "checkpoint": bool(r.checkpoint)} for r in grid}
    ray.shutdown()

    # The same adapters in one process on one GPU: the loss of each step (a report is the mean of 5).
    from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer

    torch.manual_seed(0)
    ref = GroupedTrainer(paths["model"], DatasetSpec(paths["data"], eval_size=16), device=device, eval_size=16)
    for c in CONFIGS:
        ref.add_adapter(str(c["rank"]), AdapterConfig.from_dict(task.adapter_dict({**COMMON, **c})))
    ref_losses = {c["rank"]: [] for c in CONFIGS}
    t1 = time.perf_counter()
    for _ in range(args.steps):
        for name, r in ref.step().items():
            ref_losses[int(name)].append(float(r.loss))
    if device == "cuda":
        torch.cuda.synchronize()
    ref_s = time.perf_counter() - t1
    gaps = []
    for rank, reports in rows.items():
        for rep in reports:
            s = int(rep["step"])
            want = sum(ref_losses[rank][s - 5:s]) / 5
            gaps.append(abs(rep["loss"] - want) / abs(want))
    tokens = sum(f["tokens"] or 0 for f in finals.values())
    out = {"device": f"{gpus}x " + torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)", "wall_s": wall, "steps": args.steps,
           "trials": finals, "errors": errors, "reports": rows, "max_rel_loss_gap_vs_one_gpu": max(gaps) if gaps else None,
           "tokens": tokens, "one_gpu_reference_s": ref_s,
           "command": f"python benchmarks/ranklocal_tune.py --out {args.out} --steps {args.steps}",
           "shape": "Llama-1B (hidden 2048, 16 layers, vocab 128256), bf16 random weights"}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    ok = (not errors and all(f["step"] == args.steps and math.isfinite(f["loss"]) and f["checkpoint"]
                             for f in finals.values()) and gaps and max(gaps) <= args.tol)
    print(json.dumps({k: v for k, v in out.items() if k != "reports"}, indent=1, default=str))
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


def one_rank(args: argparse.Namespace) -> int:
    """A one-rank RankLocalGroup (Ray actor, NCCL world of one on a GPU) against GroupedTrainer."""
    import ray
    import torch

    from alto_ray import LoRATask
    from alto_ray.cluster.ranklocal_ray import RankLocalGroup
    from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
    from sweep import SEQ_LEN, build_workdir

    paths = build_workdir(args.workdir, n_records=300, smoke=args.smoke)
    use_gpu = not args.smoke
    task = LoRATask(model=paths["model"], dataset=paths["data"], max_seq_len=SEQ_LEN, name="ranklocal-one")
    cfgs = {str(c["rank"]): AdapterConfig.from_dict(task.adapter_dict({**COMMON, **c})) for c in CONFIGS}
    data = DatasetSpec(paths["data"], eval_size=16)
    ray.init(include_dashboard=False)
    t0 = time.perf_counter()
    group = RankLocalGroup(paths["model"], data, num_ranks=1, use_gpu=use_gpu, trainer_kwargs={"eval_size": 16})
    setup_s = time.perf_counter() - t0
    out: dict = {"rank_info": [{k: v for k, v in i.items() if k != "model_config"} for i in group.rank_info],
                 "setup_s": setup_s}
    try:
        for name, cfg in cfgs.items():
            group.add_adapter(name, cfg)
        losses: dict = {n: [] for n in cfgs}
        t1 = time.perf_counter()
        for step in range(args.steps):
            if step == 1:
                t1 = time.perf_counter()  # the first step compiles and autotunes
            for name, r in group.step().items():
                losses[name].append(float(r.loss))
        out["group_step_s"] = (time.perf_counter() - t1) / max(args.steps - 1, 1)
        out["group_eval"] = group.evaluate()
        export = os.path.join(args.workdir, "export_one_rank")
        group.save_adapter("16", export)
        out["peak_bytes"] = group.last_peak_bytes
    finally:
        group.shutdown()
        ray.shutdown()

    device = "cuda" if use_gpu else "cpu"
    torch.manual_seed(0)
    ref = GroupedTrainer(paths["model"], data, device=device, eval_size=16)
    for name, cfg in cfgs.items():
        ref.add_adapter(name, cfg)
    ref_losses: dict = {n: [] for n in cfgs}
    t2 = time.perf_counter()
    for step in range(args.steps):
        if step == 1:
            t2 = time.perf_counter()
        for name, r in ref.step().items():
            ref_losses[name].append(float(r.loss))
    if use_gpu:
        torch.cuda.synchronize()
    out["reference_step_s"] = (time.perf_counter() - t2) / max(args.steps - 1, 1)
    out["reference_eval"] = ref.evaluate()
    gaps = [abs(a - b) / abs(b) for n in cfgs for a, b in zip(losses[n], ref_losses[n])]
    out["max_rel_loss_gap"] = max(gaps)
    out["max_rel_eval_gap"] = max(abs(out["group_eval"][n] - out["reference_eval"][n]) / abs(out["reference_eval"][n])
                                  for n in cfgs)
    del ref

    # The exported adapter is a standard PEFT one: load it on the GPU and take a loss with it.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(paths["model"], torch_dtype=torch.bfloat16).to(device)
    peft_model = PeftModel.from_pretrained(base, export)
    ids = torch.randint(4, 19, (2, 64), device=device)
    with torch.no_grad():
        peft_loss = float(peft_model(input_ids=ids, labels=ids).loss)
    out["peft_loaded_loss"] = peft_loss
    out.update({"device": torch.cuda.get_device_name(0) if use_gpu else "cpu (smoke)", "steps": args.steps,
                "losses": losses, "reference_losses": ref_losses,
                "command": f"python benchmarks/ranklocal_tune.py --ranks 1 --out {args.out} --steps {args.steps}",
                "shape": "Llama-1B (hidden 2048, 16 layers, vocab 128256), bf16 random weights"})
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    ok = (all(len(v) == args.steps and all(math.isfinite(x) for x in v) for v in losses.values())
          and out["max_rel_loss_gap"] <= args.tol and out["max_rel_eval_gap"] <= args.tol and math.isfinite(peft_loss)
          and (not use_gpu or "cuda" in out["rank_info"][0]["device"]))
    print(json.dumps({k: v for k, v in out.items() if k not in ("losses", "reference_losses")}, indent=1, default=str))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    main()
