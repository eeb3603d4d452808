"""Offline builders for tests, examples and benchmarks: a tiny Llama + tokenizer on disk, and a
synthetic learnable data set (templated arithmetic), so nothing needs a model or data hub."""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = ["what", "is", "plus", "minus", "times", "answer", "question", "the", "sum", "of", "and",
         "+", "-", "*", "=", "?", ":", ".", ",", "Q", "A"]


def build_tokenizer() -> Any:
    """A word-level tokenizer over digits (one token each), arithmetic symbols and a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [str(d) for d in range(10)] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def make_tiny_llama(path: str, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
                    num_attention_heads: int = 4, num_key_value_heads: int = 2, max_position_embeddings: int = 512,
                    seed: int = 0, **config_overrides: Any) -> str:
    """Save a randomly initialised (seeded) fp32 Llama and its tokenizer to ``path``; returns ``path``.

    Load it back through the real ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer`` path.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def arithmetic_records(n: int, seed: int = 0, max_operand: int = 50) -> List[Dict[str, str]]:
    """Prompt/completion pairs like ``what is 12 plus 7 ?`` → ``19`` — learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(["plus", "minus"])
        value = a + b if op == "plus" else a - b
        answer = str(value) if value >= 0 else f"- {-value}"
        out.append({"prompt": f"what is {a} {op} {b} ? answer :", "completion": f" {answer}"})
    return out


def write_arithmetic_jsonl(path: str, n: int = 256, seed: int = 0, max_operand: int = 50) -> str:
    """Write ``arithmetic_records`` as JSONL (one record a line); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in arithmetic_records(n, seed, max_operand):
            f.write(json.dumps(rec) + "\n")
    return path
