"""Running real workers against the test Kafka and Redis, and reading what they publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from processor.events import VerdictEvent, parse_verdict
from processor.model import GuardModel
from processor.score import score_ids
from processor.worker.serve import ensure_topics, serve
from processor.worker.settings import WorkerSettings


def worker_settings(kafka_bootstrap: str, redis_url: str, topic_prefix: str, redis_prefix: str, **overrides):
    values = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        "model": "unused (a loaded model is passed)",
        "device": "cpu",
        "dtype": "float32",
        "tokens_topic": f"{topic_prefix}.tokens",
        "verdicts_topic": f"{topic_prefix}.verdicts",
        "dlq_topic": f"{topic_prefix}.dlq",
        "group_id": f"{topic_prefix}.workers",
        "partitions": 3,
        "redis_key_prefix": redis_prefix,
        "http_port": 0,
        "kv_cache_bytes": 32 * 1024 * 1024,
        "poll_timeout_ms": 20,
        "worker_id": "worker-a",
    }
    return WorkerSettings(**(values | overrides))


@contextlib.asynccontextmanager
async def running_worker(settings: WorkerSettings, model: GuardModel) -> AsyncIterator[asyncio.Task]:
    """A worker serving until the block ends; topics exist before it yields (the group starts at the
    earliest offsets, so events sent before it joins are still consumed)."""
    await ensure_topics(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, model, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def wait_for_group(kafka_bootstrap: str, group_id: str, members: int, timeout: float = 30) -> None:
    """Until the consumer group is Stable with `members` members, so each has its partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            [response] = await admin.describe_consumer_groups([group_id])
            _, _, state, _, _, joined, *_ = response.groups[0]
            if state == "Stable" and len(joined) == members:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"group {group_id}: {state} with {len(joined)} of {members} members")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


@dataclass
class Collected:
    records: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)  # each record's, ms (set when the worker queued it)

    def verdicts(self) -> list[VerdictEvent]:
        return [parse_verdict(value) for _, value in self.records]

    def json(self) -> list[dict]:
        return [json.loads(value) for _, value in self.records]


async def collect(
    kafka_bootstrap: str, topic: str, until: Callable[[Collected], bool], timeout: float = 45
) -> Collected:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    collected = Collected()
    try:
        deadline = time.monotonic() + timeout
        while not until(collected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: only {len(collected.records)} records after {timeout}s")
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                collected.records += [(record.key, record.value) for record in records]
                collected.timestamps += [record.timestamp for record in records]
    finally:
        await consumer.stop()
    return collected


async def send_raw(
    kafka_bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def expected_token_labels(model: GuardModel, token_ids: list[int]) -> dict[int, tuple]:
    """position -> (token id, level, category, risk prob) from scoring the whole sequence at once."""
    return {
        verdict.position: (verdict.token_id, verdict.risk_level, verdict.category, verdict.risk_prob)
        for verdict in score_ids(model, token_ids)
    }


def streamed_token_labels(verdicts: list[VerdictEvent], conversation_id: str) -> dict[int, tuple]:
    labels = {}
    for verdict in verdicts:
        if verdict.conversation_id == conversation_id and verdict.kind == "tokens":
            for token in verdict.tokens:
                assert token.position not in labels, f"position {token.position} listed twice"
                labels[token.position] = (token.token_id, token.risk_level, token.category, token.risk_prob)
    return labels


def assert_labels_match(streamed: dict[int, tuple], expected: dict[int, tuple]) -> None:
    assert streamed, "no token verdicts"
    for position, (token_id, level, category, prob) in streamed.items():
        want = expected[position]
        assert (token_id, level, category) == want[:3], f"position {position}: {streamed[position]} != {want}"
        assert abs(prob - want[3]) < 1e-3, f"position {position}: prob {prob} != {want[3]}"
