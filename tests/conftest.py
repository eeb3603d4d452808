"""Shared fixtures: a tiny Llama (+ offline tokenizer) and a learnable JSONL data set, built once
per session in a temp dir. Other layers' tests reuse ``tiny_model_dir`` / ``tiny_dataset_path``."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


# Triton decides interpreted-or-compiled when a @jit function is defined, its own ``tl.cdiv`` & co.
# included: the flag must be set before any test module (transformers and peft import triton when
# it is installed) is collected, or kernels later calling ``tl.cdiv`` fail under the interpreter.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny-model tests are dispatch-bound: one intra-op thread is faster on 2 shared cores."""
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 2-layer Llama (hidden 64) with its word-level tokenizer."""
    from alto_ray.engine.testing import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """256 arithmetic prompt/completion records as JSONL."""
    from alto_ray.engine.testing import write_arithmetic_jsonl

    return write_arithmetic_jsonl(str(tmp_path_factory.mktemp("data") / "arith.jsonl"), n=256, seed=0)


@pytest.fixture(scope="session")
def interpreted_triton_env() -> dict:
    """Environment for a subprocess that runs the engine through the fused Triton kernels under
    TRITON_INTERPRET (it must be set before triton is first imported); skips without Triton."""
    import subprocess
    import sys

    import alto_kernels

    env = dict(os.environ, ALTO_TRITON="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", "import alto_kernels, sys; sys.exit(0 if alto_kernels.triton_available() else 3)"],
                           env=env, capture_output=True)
    if probe.returncode == 3 or not hasattr(alto_kernels, "multi_lora"):
        pytest.skip("the fused Triton kernel is not available here")
    return env
