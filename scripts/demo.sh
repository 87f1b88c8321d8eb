#!/usr/bin/env bash
# `make demo`: local Kafka and Redis, a model, one worker, examples/conversation.json
# streamed token by token like an LLM would, and its verdicts shown live; everything stopped after.
# Expects `guardstream` on PATH (the Makefile puts .venv/bin first).
set -euo pipefail

STATE_DIR="${STATE_DIR:-.guardstream}"
MODEL="${GUARDSTREAM_DEMO_MODEL:-}"
HUB_MODEL="Qwen/Qwen3Guard-Stream-0.6B"
CONVERSATION="demo-$(date +%s)"
mkdir -p "$STATE_DIR"
WORKER_LOG="$STATE_DIR/demo-worker.log"
VERDICTS_LOG="$STATE_DIR/demo-verdicts.log"
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    guardstream local down --state-dir "$STATE_DIR"
}
trap cleanup EXIT

echo "== local Kafka and Redis (the first run downloads Kafka once)"
guardstream local up --state-dir "$STATE_DIR"
# shellcheck disable=SC1091
source "$STATE_DIR/env"

echo "== model"
if [ -z "$MODEL" ]; then
    # The real checkpoint when the hub answers (or is cached); otherwise an offline test model.
    if MODEL_PATH=$(timeout 600 python - "$HUB_MODEL" 2>/dev/null <<'PY'
import sys
from huggingface_hub import snapshot_download
from processor.model.loader import HUB_FILE_PATTERNS
print(snapshot_download(sys.argv[1], allow_patterns=HUB_FILE_PATTERNS, etag_timeout=10))
PY
    ); then
        MODEL="$MODEL_PATH"
        echo "using $HUB_MODEL"
    else
        MODEL="$STATE_DIR/models/test-tiny"
        [ -f "$MODEL/config.json" ] || guardstream make-test-model "$MODEL" --size tiny --seed 0 >/dev/null
        printf '\n\033[1;33m%s\033[0m\n%s\n\n' \
            "*** $HUB_MODEL could not be downloaded here: using a RANDOM-WEIGHT test model. ***" \
            "*** Its verdicts are random; the pipeline around them is real. ***"
    fi
fi

HTTP_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== worker (log: $WORKER_LOG, metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
guardstream worker --kafka-bootstrap "$KAFKA_BOOTSTRAP" --redis-url "$REDIS_URL" --model "$MODEL" \
        --http-port "$HTTP_PORT" --partitions 3 --log-level WARNING >"$WORKER_LOG" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
    python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$HTTP_PORT/readyz', timeout=2)" \
        2>/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$WORKER_LOG"; exit 1; }
    sleep 1
done

echo "== streaming examples/conversation.json as $CONVERSATION, one token per event; verdicts live:"
# Process substitution, not a pipe: $! is then the reader itself, which cleanup can stop.
guardstream verdicts --follow --kafka-bootstrap "$KAFKA_BOOTSTRAP" --model "$MODEL" \
    --conversation-id "$CONVERSATION" > >(tee "$VERDICTS_LOG") &
pids+=($!)
guardstream produce examples/conversation.json --kafka-bootstrap "$KAFKA_BOOTSTRAP" --model "$MODEL" \
    --conversation-id "$CONVERSATION" --chunk 1 --rate 20 >/dev/null
for _ in $(seq 1 60); do
    grep -q conversation_end "$VERDICTS_LOG" 2>/dev/null && break
    sleep 1
done
grep -q conversation_end "$VERDICTS_LOG" || { echo "no conversation_end verdict; worker log:"; cat "$WORKER_LOG"; exit 1; }
echo "== demo done; stopping the worker and the services"
