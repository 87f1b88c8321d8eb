"""A prepared step (its model run, waiting to publish, save and commit) keeps what its finish needs
and none of its records: steps stay in flight for a few cycles, and per-event objects kept that long
made the garbage collector's young collections walk tens of thousands of them (long pauses)."""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass

from aiokafka import TopicPartition

from processor.engine import AsyncGuardEngine, GuardEngine
from processor.model import load_guard_model
from processor.worker.metrics import WorkerMetrics
from processor.worker.session_store import Session
from processor.worker.settings import WorkerSettings
from processor.worker.worker import StepCounts, Worker, engine_config

TOPIC = TopicPartition("guard.tokens", 0)


@dataclass
class Record:
    """What `Worker.prepare` reads of an aiokafka ConsumerRecord (this one can be weakly referenced)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0


class AssignedConsumer:
    def assignment(self) -> set[TopicPartition]:
        return {TOPIC}

    def highwater(self, partition: TopicPartition) -> None:
        return None


def token_event(conversation_id: str, seq: int, offset: int) -> Record:
    value = {"conversation_id": conversation_id, "seq": seq, "role": "assistant", "token_ids": [1000, 1001]}
    return Record(TOPIC.topic, TOPIC.partition, offset, conversation_id.encode(), json.dumps(value).encode())


async def test_a_prepared_step_keeps_its_offsets_and_counts_not_its_records(tiny_model_dir):
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    settings = WorkerSettings(model=str(tiny_model_dir), template="raw", kv_cache_bytes=4 * 1024 * 1024)
    front = AsyncGuardEngine(GuardEngine(model, engine_config(settings)))
    worker = Worker(settings, model, front, None, AssignedConsumer(), None, WorkerMetrics())  # type: ignore[arg-type]
    for conversation_id in ("a", "b"):
        worker.sessions.put(Session(conversation_id, stored=True))  # no Redis: sessions start here
    # a: seq 0, 1, 2; b: seq 0, 1, and seq 0 again (a redelivery: counted as a duplicate, not applied)
    records = [
        token_event(conversation_id, seq, offset)
        for offset, (conversation_id, seq) in enumerate(
            [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 0)], start=40
        )
    ]
    alive = [weakref.ref(record) for record in records]
    try:
        prepared = await worker.prepare({TOPIC: records}, asyncio.Event())
        del records
        assert [record() for record in alive] == [None] * len(alive)
        assert prepared is not None
        assert prepared.offsets == {TOPIC: 46}
        assert prepared.counts == StepCounts(events=6, tokens=10, applied=5, duplicates=1)
        verdicts = [verdict for outcome in prepared.outcomes for verdict in outcome.verdicts]
        assert sorted((v["conversation_id"], v["seq"]) for v in verdicts) == [
            ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)
        ]  # fmt: skip
    finally:
        await front.close()
