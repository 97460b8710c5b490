#!/usr/bin/env bash
# The test command: sets up ./.venv, checks style, runs the whole suite (GPU/NPU cases skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -ra "$@"
