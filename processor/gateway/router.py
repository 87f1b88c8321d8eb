"""Verdicts to the replica that holds the conversation.

Each replica reads every partition of the verdicts topic, with no consumer group, from the end as it
was when the replica started, and keeps only the conversations it registered: the record key is the
conversation id, so every other record is skipped without parsing its value. The cost is that every
replica reads all verdict traffic (replicas x verdict bytes a second in total); docs/gateway.md says
when that stops scaling and what to do then.

Registration must come before the conversation's first token event is produced, and `start` returns
only once every partition's end offset is resolved, so no verdict of a registered conversation can be
missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from processor.events import VerdictEvent, parse_verdict

log = logging.getLogger(__name__)

VerdictSink = Callable[[VerdictEvent], None]


class VerdictRouter:
    def __init__(self, topic: str, kafka_options: dict[str, object], topic_wait_s: float = 60.0) -> None:
        self.topic = topic
        self._consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="latest", **kafka_options
        )
        self._sinks: dict[bytes, VerdictSink] = {}
        self._task: asyncio.Task | None = None
        self._topic_wait_s = topic_wait_s
        self.running = False

    async def start(self) -> None:
        await self._consumer.start()
        partitions = await self._partitions()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for partition in partitions:  # resolve now: a verdict produced after start is never skipped
            await self._consumer.position(partition)
        self._task = asyncio.create_task(self._run(), name="verdict-router")
        self.running = True

    async def stop(self) -> None:
        self.running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def register(self, conversation_id: str, sink: VerdictSink) -> bool:
        """False when the conversation is already waiting here: two requests cannot share an id."""
        key = conversation_id.encode()
        if key in self._sinks:
            return False
        self._sinks[key] = sink
        return True

    def unregister(self, conversation_id: str) -> None:
        self._sinks.pop(conversation_id.encode(), None)

    @property
    def registered(self) -> int:
        """Conversations waiting for verdicts on this replica."""
        return len(self._sinks)

    async def _partitions(self) -> list[TopicPartition]:
        """Every partition of the topic, waiting for the topic to exist (workers create it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._topic_wait_s
        while True:
            # aiokafka has no public call that returns a fresh partition list without subscribing.
            cluster = await self._consumer._client.fetch_all_metadata()
            numbers = cluster.partitions_for_topic(self.topic)
            if numbers:
                return [TopicPartition(self.topic, number) for number in sorted(numbers)]
            if loop.time() > deadline:
                raise RuntimeError(
                    f"topic {self.topic} does not exist: start a worker (it creates the topics) or create it"
                )
            log.info("waiting for topic %s to exist", self.topic)
            await asyncio.sleep(1.0)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker hiccup must not end routing; aiokafka reconnects
                log.exception("reading %s failed; retrying", self.topic)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    sink = self._sinks.get(record.key) if record.key is not None else None
                    if sink is None:
                        continue
                    try:
                        verdict = parse_verdict(record.value)
                    except ValidationError as error:
                        log.warning("skipping a malformed verdict at offset %d: %s", record.offset, error)
                        continue
                    sink(verdict)
