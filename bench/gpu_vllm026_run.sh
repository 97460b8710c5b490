#!/usr/bin/env bash
# vLLM 0.26 on the lent H200 GPU machine, through the `run` tool, after the kit's three pieces were sent in three
# back-to-back runs (../shared/gpu/vllm026_kit.sh, built here into the git-ignored .carry/):
#   run 1 (carry .carry/vllm026-1):  bash .carry/vllm026-1/stash.sh
#   run 2 (carry .carry/vllm026-2):  bash .carry/vllm026-2/stash.sh
#   run 3 (carry .carry/vllm026-3):  bash bench/gpu_vllm026_run.sh STAGE [ARGS...]
#   later runs while the machine stays warm: bash bench/gpu_vllm026_run.sh STAGE [ARGS...] (no carry needed)
# Stages (each writes under $OUT):
#   hooks        the CUDA cases of the sparse hook tests (FLASH_ATTN layout, ESA engines with CUDA graphs)
#   correctness  bench/gpu_correctness.py (connector / prefix reuse / corruption / ESA checks) -> JSON
#   e2e ARGS     bench/gpu_e2e.py ARGS (decode speed ESA vs dense) -> JSON/MD/PNG
#   bench        bench/esa_step.py and bench/score_topk.py (kernel-level) -> JSON/MD
#   score        bench/score_topk.py alone (retrieval and the initial selection by attention vs SDPA)
#   parity ARGS  pytest tests/parity ARGS (the device layer's CUDA cases against the reference)
#   copy ARGS    bench/copy_overlap.py ARGS (loads beside a forward: copy kernel vs copy engines) -> JSON/MD
#   gate         bench/stream_gate_check.py (does a held stream hold other streams?), default and 32 connections
# What comes back from the device is at most 8 files, 2 folders down: point OUT at a scratch folder and tar it into
# the real $OUT on exit (trap), and give each e2e part its own --out (several parts with --merge share one JSON).
# Measured on the H200 (2026-12-04): the first engine on a fresh machine takes ~80 s to start (compilation), later
# ones ~45-65 s; a 32K x 8 case with 2 repetitions ~40 s; budget an e2e part as starts + cases, not less.
# A fresh machine's start counts against the device budget; the run that starts a stage must carry
# .carry/vllm026-3 (its install.sh), also after a failed call. An e2e part of dense + esa-full at 32Kx1, 32Kx8 and
# 128Kx1 (4 engines) took 462 s (bench/results/gpu_runs/e2e_boundary_e24f0dd.log).
# Measured on the H100 (2026-12-06, fourth session): calls 1 and 2 cost ~30 s of device time together (the machine's
# start included); the first ESA engine of a fresh machine ~75 s to start (17 s of compilation), a 32Kx8 part of
# 2 repetitions ~170 s with it and ~85 s per later engine; an e2e part skips an engine unless --time-budget-s
# leaves --case-reserve-s (default 150) + 90 s: pass --case-reserve-s 5-15 for 32K cases, and give a capacity part
# >= 300 s. Outside a stage, python needs the stage's PYTHONPATH: run a test file through `parity FILE -k ...`.
# Fifth session (H100): a start that gets no machine costs 90-180 s of device time and blocks that kind for ~10
# min; a lease can be taken back mid-run (what the call left under $OUT is lost with it): plan the most needed
# measurement first, each call self-contained (kit pieces only on a fresh machine), and keep --time-budget-s.
set -u
stage=${1:-hooks}; shift || true
OUT=${OUT:-/tmp/ucm-gpu-out}
mkdir -p "$OUT"
if [ -f .carry/vllm026-3/install.sh ] || [ ! -f /tmp/vllm026/.done ]; then
  # shellcheck disable=SC1091
  source .carry/vllm026-3/install.sh || exit 3
else
  export PYTHONPATH="/tmp/vllm026${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0
fi
# ucm with its entry points (vllm.general_plugins needs installed metadata); rebuilt each run from this tree
rm -rf /tmp/ucm && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/ucm . >/dev/null 2>&1 \
  || { echo "ucm install failed"; exit 4; }
export VLLM_CACHE_ROOT=/tmp/vllm-cache  # compiled graphs reused by later engines and calls on a warm machine
export PYTHONPATH="$PYTHONPATH:/tmp/ucm" UCM_VLLM026_PYTHON=$(command -v python3) TOKENIZERS_PARALLELISM=false
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -P -c "import torch, vllm, ucm;
print('torch', torch.__version__, 'vllm', vllm.__version__, 'ucm from', ucm.__file__)"; echo "commit $commit"; } \
  | tee "$OUT/env.txt"
# python3 -P: the checkout's own ucm/ must not shadow /tmp/ucm; where a child process still imports it (a -c
# script puts the working directory first), the kernel and backend folders resolve through these links
ln -sfn ../kernels ucm/kernels
ln -sfn ../../backends/cuda ucm/backends/cuda
# The long stages write their whole log to the file as it comes (unbuffered), not a tail through a pipe: a part
# cut off by its `timeout` still says how far it got (a piped tail printed nothing and kept nothing)
export PYTHONUNBUFFERED=1
case $stage in
  hooks)
    python3 -P -m pytest -p no:cacheprovider -q -rs tests/integration/test_sparse_kv_layout.py \
      tests/integration/test_sparse_e2e.py -k "cuda or flash" 2>&1 | tee "$OUT/gpu_hooks_vllm026.txt"
    ;;
  correctness)
    python3 -P bench/gpu_correctness.py --dtype bfloat16 --out "$OUT/gpu_correctness.json" "$@" \
      >>"$OUT/gpu_correctness.log" 2>&1
    tail -80 "$OUT/gpu_correctness.log"
    ;;
  e2e)
    python3 -P bench/gpu_e2e.py --out "$OUT/gpu_e2e.json" "$@" >>"$OUT/gpu_e2e.log" 2>&1
    tail -120 "$OUT/gpu_e2e.log"
    ;;
  bench)
    python3 -P bench/esa_step.py --out "$OUT/esa_step_h200.json" "$@" 2>&1 | tail -40
    python3 -P bench/score_topk.py --out-dir "$OUT/score_topk_h200" 2>&1 | tail -40
    ;;
  parity)
    python3 -P -m pytest -p no:cacheprovider -q tests/parity "$@" 2>&1 | tee "$OUT/gpu_parity.txt" | tail -30
    ;;
  copy)
    python3 -P bench/copy_overlap.py --out-dir "$OUT" "$@" 2>&1 | tail -20
    ;;
  gate)
    python3 -P bench/stream_gate_check.py --out "$OUT/stream_gate_check.json" "$@" 2>&1 | tail -20
    CUDA_DEVICE_MAX_CONNECTIONS=32 python3 -P bench/stream_gate_check.py --out "$OUT/stream_gate_check_c32.json" \
      "$@" 2>&1 | tail -20
    ;;
  score)
    python3 -P bench/score_topk.py --out-dir "$OUT/score_topk_h200" "$@" 2>&1 | tail -40
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
