#!/usr/bin/env bash
# Demo body for `make demo`. For now it shows the local services working end to end; the worker
# demo replaces this file later. Expects `guardstream` on PATH (the Makefile puts .venv/bin first).
set -euo pipefail

STATE_DIR="${STATE_DIR:-.guardstream}"
cleanup() { guardstream local down --state-dir "$STATE_DIR"; }
trap cleanup EXIT

echo "== starting local Kafka and Redis (first run downloads Kafka once)"
guardstream local up --state-dir "$STATE_DIR"
# shellcheck disable=SC1091
source "$STATE_DIR/env"

echo "== both services answer"
python - "$KAFKA_BOOTSTRAP" "$REDIS_URL" <<'PY'
import asyncio
import sys
import time

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

bootstrap, redis_url = sys.argv[1], sys.argv[2]
topic = f"guardstream-demo-{time.time_ns():x}"


async def main() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=b"demo-session", value=b"hello from guardstream")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        print(f"kafka  {bootstrap}: read back {record.value.decode()!r} from {topic}")
    finally:
        await consumer.stop()
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await client.set("guardstream:demo", "hello from guardstream", ex=60)
        print(f"redis  {redis_url}: read back {await client.get('guardstream:demo')!r}")
    finally:
        await client.aclose()


asyncio.run(main())
PY
guardstream local status --state-dir "$STATE_DIR"
echo "== demo done; stopping the services"
