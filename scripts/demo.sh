#!/usr/bin/env bash
# The main job: sets up ./.venv and runs the offline demo on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/offline_inference.py "$@"
