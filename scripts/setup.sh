#!/usr/bin/env bash
# Creates .venv and installs alto-ray with its test extra. On a machine without a GPU the
# CPU build of torch is pinned first (a plain `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${ALTO_CPU_TORCH:-2.13.0}"
fi
python -m pip install -q -e ".[test]"
