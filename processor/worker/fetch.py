"""Fetching a step's records, and decoding the first of them while the fresh fetch is in flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from processor.worker.conversation import ConversationStep, Incoming
from processor.worker.dlq import DeadLetter
from processor.worker.health import StallWatch
from processor.worker.pipeline import SessionCache
from processor.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How long poll_records lets the loop run before working on the first records. A short sleep, not a
# count of turns: every task the drain and the last step's finish made ready (aiokafka's fetcher, which
# then starts a task that writes the fetch; the producer's sender, with that step's verdicts) runs on to
# its next wait, however many turns that takes, and the loop idles at most this long.
LET_THE_LOOP_RUN_SECONDS = 0.0005


@dataclass
class DecodedAhead:
    """A step's first records, decoded (and planned, where the session was in memory) during the poll
    while the fresh fetch was in flight."""

    counts: dict[TopicPartition, int]  # the first `count` records of each partition's list
    incoming: dict[str, list[Incoming]]
    dead_letters: list[DeadLetter]
    # Per conversation its plan and how many of its events it covers. A plan is a pure function of the
    # session and the events: prepare keeps it while the session in memory is that same object and no
    # event was added.
    planned: dict[str, tuple[ConversationStep, int]]


async def poll_records(
    consumer: AIOKafkaConsumer,
    timeout_ms: int,
    max_records: int,
    fresh_fetch_ms: int,
    while_fetching: Callable[[dict[TopicPartition, list[ConsumerRecord]]], None] | None = None,
    assignment_epoch: Callable[[], int | None] = lambda: 0,
) -> dict[TopicPartition, list[ConsumerRecord]]:
    """A step's records: what the consumer holds, then what the fetch its drain sets off brings (up to
    `fresh_fetch_ms` for it; 0: one poll).

    All of one assignment (`assignment_epoch`, read as each getmany returns; None: a rebalance is
    under way): records fetched for an old assignment are left to the partitions' next owner, and
    when a rebalance falls between the two getmany calls the new assignment's records are sought
    back (no step of that assignment has run yet) and the step is empty: none is lost or mixed.

    aiokafka fetches a partition again only once its buffered records are drained, one fetch in flight
    per broker, and the event loop is busy while a step runs: the records held at a poll are those that
    arrived before the last step's early fetch, and the ones that arrived during that step would wait
    a whole step more (`--fresh-fetch-ms`)."""
    batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    if (epoch := assignment_epoch()) is None:
        return {}
    count = sum(len(records) for records in batch.values())
    if batch and fresh_fetch_ms and count < max_records:
        if while_fetching is not None:
            # The drain woke the consumer's fetcher: once its request is on the wire, the first
            # records' work overlaps the broker's answer instead of following it.
            await asyncio.sleep(LET_THE_LOOP_RUN_SECONDS)
            while_fetching(batch)
        more = await consumer.getmany(timeout_ms=fresh_fetch_ms, max_records=max_records - count)
        if (now := assignment_epoch()) != epoch:
            if now is not None:
                for partition, records in more.items():
                    consumer.seek(partition, records[0].offset)
            return {}
        for partition, records in more.items():  # later offsets than the first poll's: after them
            batch.setdefault(partition, []).extend(records)
    return batch


class Fetching:
    """`Worker`'s poll (worker.py holds the state; decode and plan are the prepare stage's)."""

    settings: WorkerSettings
    consumer: AIOKafkaConsumer
    sessions: SessionCache
    health: StallWatch
    _spent: list[object]
    _revoked_since_poll: set[TopicPartition]

    # Of the other stages, which the worker has too.
    decode: Callable[..., tuple[dict[str, list[Incoming]], list[DeadLetter]]]
    plan: Callable[..., ConversationStep]
    assignment_epoch: Callable[[], int | None]

    async def poll(self) -> tuple[dict[TopicPartition, list[ConsumerRecord]], DecodedAhead | None]:
        """A step's records, the first of them decoded and planned while the fresh fetch is in flight
        (the loop would only wait for it)."""
        settings, ahead = self.settings, None

        def decode_ahead(first: dict[TopicPartition, list[ConsumerRecord]]) -> None:
            nonlocal ahead
            self.release_spent()  # the loop would only wait for the fetch
            try:
                incoming, dead_letters = self.decode(
                    [record for records in first.values() for record in records]
                )
                planned = {}
                for conversation_id, items in incoming.items():
                    if (session := self.sessions.get(conversation_id)) is not None:
                        planned[conversation_id] = (self.plan(session, items), len(items))
            except Exception:  # prepare does it all again, under the step's failure handling
                log.exception("decoding a step's first records during the poll failed")
                return
            counts = {partition: len(records) for partition, records in first.items()}
            ahead = DecodedAhead(counts, incoming, dead_letters, planned)

        batch = await poll_records(
            self.consumer,
            settings.poll_timeout_ms or 100,
            settings.poll_max_records,
            settings.fresh_fetch_ms,
            while_fetching=decode_ahead,
            assignment_epoch=self.assignment_epoch,
        )
        self.health.fetched()
        self._revoked_since_poll = set()  # the batch is of the assignment in force now
        self.release_spent()  # when there was no fetch to wait for
        return batch, (ahead if batch else None)

    def release_spent(self) -> None:
        """Free the last step's records, events and plans (the poll does, while its fetch is in flight)."""
        self._spent.clear()
