"""Train 8 LoRA adapters of different ranks and learning rates together on a tiny Llama.

Everything is built offline in a temp dir (model, tokenizer, a templated-arithmetic data set);
the 8 adapters share one frozen backbone and every step is ONE packed forward + backward.
Runs in well under a minute on a CPU; uses the GPU when there is one.

    python examples/engine_demo.py [--steps 80]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from alto_ray.engine.testing import make_tiny_llama, write_arithmetic_jsonl

RANKS = (2, 4, 8, 16)
LRS = (3e-3, 1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # a tiny model is dispatch-bound: extra threads only contend
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_llama(f"{tmp}/model", hidden_size=96, intermediate_size=192, num_hidden_layers=2)
        data_path = write_arithmetic_jsonl(f"{tmp}/arith.jsonl", n=512, seed=0)
        trainer = GroupedTrainer(model_dir, DatasetSpec(data_path, eval_size=32), device=device, eval_size=32)
        for rank in RANKS:
            for lr in LRS:
                trainer.add_adapter(f"r{rank}_lr{lr:g}", AdapterConfig(
                    rank=rank, alpha=2 * rank, lr=lr, batch_size=8, max_seq_len=32, warmup_steps=5,
                    max_steps=args.steps, lr_schedule="cosine", seed=rank))
        print(f"{trainer.num_adapters} adapters on {device}, {args.steps} grouped steps")
        start_eval = trainer.evaluate()
        curves = {name: [] for name in trainer.adapter_names}
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(args.steps):
            for name, res in trainer.step().items():
                curves[name].append(res.loss)
                tokens += res.tokens
        elapsed = time.perf_counter() - t0
        end_eval = trainer.evaluate()
        print(f"{'adapter':<14} {'loss first5':>11} {'loss last5':>10} {'eval before':>11} {'eval after':>10}")
        for name, curve in curves.items():
            head, tail = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
            print(f"{name:<14} {head:>11.3f} {tail:>10.3f} {start_eval[name]:>11.3f} {end_eval[name]:>10.3f}")
        print(f"{tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tok/s, all adapters together)")


if __name__ == "__main__":
    main()
