"""End-to-end pipeline benchmark: offered load (conversations x events/s, one token per event) through a
real worker process, next to the raw ceiling of an aiokafka consume+produce loop measured in the same run.

    python bench/pipeline.py --model /tmp/tiny --device cuda --conversations 200 --rate 20000 --seconds 20

Without --kafka-bootstrap / --redis-url it starts local services (processor.local) and stops them after.
Prints one JSON object: offered and sustained events/s, p50/p99 latency from event ts to verdict receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        await admin.close()


async def raw_ceiling(bootstrap: str, events: int, partitions: int) -> float:
    """Events/s of getmany -> json parse -> produce -> await acks, with no model and no Redis."""
    source, sink = f"bench.raw.{uuid.uuid4().hex[:8]}", f"bench.raw-out.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, [source, sink], partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", enable_idempotence=True)
    await producer.start()
    for index in range(events):
        value = json.dumps(
            {
                "conversation_id": f"c{index % 500}",
                "seq": index,
                "role": "assistant",
                "token_ids": [index % 1000],
                "ts": time.time(),
            }
        ).encode()
        await producer.send(source, value, key=f"c{index % 500}".encode())
    await producer.flush()
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    done, started = 0, None
    while done < events:
        batch = await consumer.getmany(timeout_ms=500, max_records=2000)
        started = started or time.perf_counter()
        sends = []
        for records in batch.values():
            for record in records:
                event = json.loads(record.value)
                sends.append(
                    await producer.send(sink, json.dumps({"seq": event["seq"]}).encode(), key=record.key)
                )
        await asyncio.gather(*sends)
        if batch:
            await consumer.commit()
        done += sum(len(records) for records in batch.values())
    seconds = time.perf_counter() - started
    await consumer.stop()
    await producer.stop()
    return events / seconds


async def offered_load(args, bootstrap: str, tokens_topic: str, verdicts_topic: str) -> dict:
    latencies: list[float] = []
    received = 0
    sent_at: dict[tuple[str, int], float] = {}
    consumer = AIOKafkaConsumer(
        verdicts_topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    stop_reading = asyncio.Event()

    async def read() -> None:
        nonlocal received
        while not stop_reading.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for record in records:
                    verdict = json.loads(record.value)
                    if verdict["kind"] != "tokens" or verdict["role"] != "assistant":
                        continue
                    received += 1
                    started = sent_at.pop((verdict["conversation_id"], verdict["seq"]), None)
                    if started is not None:
                        latencies.append(now - started)

    reader = asyncio.create_task(read())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks="all", enable_idempotence=True)
    await producer.start()
    conversations = [f"bench-{uuid.uuid4().hex[:6]}-{i}" for i in range(args.conversations)]
    seq = dict.fromkeys(conversations, 0)
    # A short user turn first, then one assistant token per event, round robin, paced to the rate.
    for conversation_id in conversations:
        value = json.dumps(
            {
                "conversation_id": conversation_id,
                "seq": 0,
                "role": "user",
                "token_ids": [9707, 11, 1246],
                "end_of_turn": True,
            }
        ).encode()
        await producer.send(tokens_topic, value, key=conversation_id.encode())
        seq[conversation_id] = 1
    await producer.flush()
    await asyncio.sleep(2)
    total = int(args.rate * args.seconds)
    started = time.perf_counter()
    for index in range(total):
        conversation_id = conversations[index % len(conversations)]
        due = started + index / args.rate
        delay = due - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        now = time.time()
        number = seq[conversation_id]
        seq[conversation_id] = number + 1
        sent_at[(conversation_id, number)] = now
        value = json.dumps(
            {
                "conversation_id": conversation_id,
                "seq": number,
                "role": "assistant",
                "token_ids": [1000 + index % 5000],
                "ts": now,
            }
        ).encode()
        await producer.send(tokens_topic, value, key=conversation_id.encode())
    await producer.flush()
    send_seconds = time.perf_counter() - started
    deadline = time.monotonic() + 30
    while received < total and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    stop_reading.set()
    await reader
    await consumer.stop()
    await producer.stop()
    return {
        "offered_events_per_s": round(total / send_seconds),
        "sustained_events_per_s": round(received / elapsed),
        "events_sent": total,
        "token_verdicts_received": received,
        "latency_p50_ms": round(1000 * (percentile(latencies, 0.5) or 0), 2),
        "latency_p99_ms": round(1000 * (percentile(latencies, 0.99) or 0), 2),
    }


async def main_async(args) -> dict:
    with contextlib.ExitStack() as stack:
        bootstrap, redis_url = args.kafka_bootstrap, args.redis_url
        if not bootstrap or not redis_url:
            from processor.local.testing import kafka_endpoint, redis_endpoint

            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-services-")))
            bootstrap = bootstrap or kafka_endpoint(stack, state)
            redis_url = redis_url or redis_endpoint(stack, state)
        ceiling = await raw_ceiling(bootstrap, args.raw_events, args.partitions)
        prefix = f"bench.{uuid.uuid4().hex[:8]}"
        tokens_topic, verdicts_topic = f"{prefix}.tokens", f"{prefix}.verdicts"
        await create_topics(bootstrap, [tokens_topic, verdicts_topic, f"{prefix}.dlq"], args.partitions)
        environment = os.environ | {
            "GUARDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "GUARDSTREAM_REDIS_URL": redis_url,
            "GUARDSTREAM_MODEL": args.model,
            "GUARDSTREAM_DEVICE": args.device,
            "GUARDSTREAM_TEMPLATE": "raw",
            "GUARDSTREAM_TOKENS_TOPIC": tokens_topic,
            "GUARDSTREAM_VERDICTS_TOPIC": verdicts_topic,
            "GUARDSTREAM_DLQ_TOPIC": f"{prefix}.dlq",
            "GUARDSTREAM_GROUP_ID": f"{prefix}.workers",
            "GUARDSTREAM_REDIS_KEY_PREFIX": f"{prefix}:",
            "GUARDSTREAM_HTTP_PORT": "0",
        }
        if args.dtype:
            environment["GUARDSTREAM_DTYPE"] = args.dtype
        kv_cache_bytes = args.kv_cache_bytes or (256 * 1024 * 1024 if args.device == "cpu" else None)
        if kv_cache_bytes:
            environment["GUARDSTREAM_KV_CACHE_BYTES"] = str(kv_cache_bytes)
        worker = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "worker", "--log-level", "WARNING"],
            cwd=ROOT,
            env=environment,
        )
        try:
            await asyncio.sleep(args.warmup)
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode} before the load started")
            load = await offered_load(args, bootstrap, tokens_topic, verdicts_topic)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    return {
        "raw_consume_produce_events_per_s": round(ceiling),
        **load,
        "conversations": args.conversations,
        "device": args.device,
        "model": args.model,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (guardstream make-test-model DIR)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kafka-bootstrap")
    parser.add_argument("--redis-url")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10_000, help="offered token events per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--raw-events", type=int, default=100_000)
    parser.add_argument("--warmup", type=float, default=15, help="seconds for the worker to load and join")
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
