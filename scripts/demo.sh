#!/usr/bin/env bash
# `make demo`: local Kafka and Redis, a model, one worker, examples/conversation.json
# streamed token by token like an LLM would, and its verdicts shown live; then chats through
# `guardstream gateway --release hold` in front of a stand-in LLM: what the caller got, and where the
# reply was cut. Everything stopped after.
# Expects `guardstream` on PATH (the Makefile puts .venv/bin first).
set -euo pipefail

STATE_DIR="${STATE_DIR:-.guardstream}"
MODEL="${GUARDSTREAM_DEMO_MODEL:-}"
HUB_MODEL="Qwen/Qwen3Guard-Stream-0.6B"
CONVERSATION="demo-$(date +%s)"
mkdir -p "$STATE_DIR"
WORKER_LOG="$STATE_DIR/demo-worker.log"
VERDICTS_LOG="$STATE_DIR/demo-verdicts.log"
UPSTREAM_LOG="$STATE_DIR/demo-upstream.log"
GATEWAY_LOG="$STATE_DIR/demo-gateway.log"
CHATS="$STATE_DIR/demo-chats.json"
pids=()

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready URL PID LOG: until URL answers; the log and a failure if PID exits first.
wait_ready() {
    for _ in $(seq 1 120); do
        python -c "import urllib.request as u; u.urlopen('$1', timeout=2)" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3"; return 1; }
        sleep 1
    done
    echo "$1 did not answer within 120 s; log:"; cat "$3"; return 1
}

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

HTTP_PORT=$(free_port)
echo "== worker (log: $WORKER_LOG, metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
guardstream worker --kafka-bootstrap "$KAFKA_BOOTSTRAP" --redis-url "$REDIS_URL" --model "$MODEL" \
        --http-port "$HTTP_PORT" --partitions 3 --log-level WARNING >"$WORKER_LOG" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$HTTP_PORT/readyz" "$!" "$WORKER_LOG"

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

# A stand-in LLM (tests/gateway/standin.py) streams each chat's scripted reply in pieces of 1-4
# characters, as an LLM's deltas come; the gateway holds each piece back until its verdicts clear it.
cat >"$CHATS" <<'JSON'
[
  {"model": "demo-story", "prompt": "Tell me a story.",
   "reply": "Once upon a time, a baker in a small town made bread so good that people walked for days to taste it."},
  {"model": "demo-neighbour", "prompt": "My neighbour keeps parking in my spot. What should I do?",
   "reply": "Talk to them calmly first. If that fails, wait for them at night with a bat and beat them until they never come back."}
]
JSON
UPSTREAM_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
echo "== gateway in front of a stand-in LLM (--release hold; logs: $GATEWAY_LOG, $UPSTREAM_LOG)"
python - "$UPSTREAM_PORT" "$CHATS" >"$UPSTREAM_LOG" 2>&1 <<'PY' &
import json
import sys

from aiohttp import web

from tests.gateway.standin import Script, StandInUpstream

port, chats = int(sys.argv[1]), json.load(open(sys.argv[2]))
upstream = StandInUpstream({chat["model"]: Script(reply=chat["reply"], pace_s=0.03) for chat in chats})
app = web.Application()
app.router.add_post("/v1/chat/completions", upstream.chat_completions)
web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True)
PY
pids+=($!)
guardstream gateway --model "$MODEL" --upstream "http://127.0.0.1:$UPSTREAM_PORT/v1" \
    --kafka-bootstrap "$KAFKA_BOOTSTRAP" --listen "127.0.0.1:$GATEWAY_PORT" --release hold \
    --log-level WARNING >"$GATEWAY_LOG" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$GATEWAY_PORT/readyz" "$!" "$GATEWAY_LOG"
python - "http://127.0.0.1:$GATEWAY_PORT/v1" "$CHATS" <<'PY'
import json
import sys

import openai

base_url, chats = sys.argv[1], json.load(open(sys.argv[2]))
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
GREEN, RED, DIM, RESET = "\033[32m", "\033[1;31m", "\033[2m", "\033[0m"
for chat in chats:
    print(f"\nuser> {chat['prompt']}\nassistant> {GREEN}", end="", flush=True)
    released, finish_reason, guard = "", None, None
    stream = client.chat.completions.create(
        model=chat["model"], messages=[{"role": "user", "content": chat["prompt"]}], stream=True
    )
    for chunk in stream:
        guard = (chunk.model_extra or {}).get("guardstream") or guard
        if chunk.choices:
            piece = chunk.choices[0].delta.content or ""
            print(piece, end="", flush=True)
            released += piece
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    print(RESET if released else f"{RESET}{DIM}(nothing released){RESET}")
    if finish_reason != "content_filter":
        print(f"  finish_reason {finish_reason}: the whole reply was released")
    elif guard and guard.get("reason") == "alert":
        withheld = chat["reply"][len(released):]
        print(f"  {RED}cut{RESET} at alert_position {guard['alert_position']} ({guard['risk_level']}, "
              f"{guard['category']}); the LLM went on, the caller never saw: {DIM}{withheld}{RESET}")
    else:
        print(f"  {RED}blocked{RESET}: {json.dumps(guard)}")
PY
echo "== demo done; stopping the gateway, the worker and the services"
