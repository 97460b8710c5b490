#!/usr/bin/env bash
# The stores' one run on the lent GPU machine (checkout not installed, no internet), through the `run` tool:
#   bash bench/store_gpu_run.sh      (carry: build/wheels312 = the xxhash wheel for Python 3.12, from pip download)
# Writes $OUT/store_dram_gpu.{json,md}, $OUT/store_nfs_gpu.json (UcmNfsStore with a GPU cache: the staged path)
# and, as a second opinion on an idle 16-core host, $OUT/store_nfs_gpuhost.*.
set -u
OUT=${OUT:-/tmp/ucm-store-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
ln -sfn ../kernels ucm/kernels
ln -sfn ../../backends/cuda ucm/backends/cuda
export PYTHONPATH=$PWD
python -c "import xxhash" 2>/dev/null || pip install -q --no-index build/wheels312/xxhash-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader || true
timeout 90 python bench/store_dram_gpu.py --device "$DEVICE" --blocks "${BLOCKS:-512}" --reps 5 \
  --out "$OUT/store_dram_gpu.json"
echo "dram rc=$?"
timeout 30 python bench/store_nfs_gpu.py --device "$DEVICE" --blocks 128 --reps 3 --out "$OUT/store_nfs_gpu.json"
echo "nfs-gpu rc=$?"
timeout 40 python bench/store_nfs.py --sizes-mib 1,32 --total-mib 256 --reps 2 --dir /tmp/ucm-nfs-bench \
  --out "$OUT/store_nfs_gpuhost"
echo "nfs rc=$?"
