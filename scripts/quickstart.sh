#!/usr/bin/env bash
# The README's main job: set up (idempotent), then a small sweep on a local Ray cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python examples/quickstart.py "$@"
