"""Finishing a step: publish its verdicts, save its sessions, commit its offsets, in that order.

The delivery guarantee (at least once) is this order of statements in `Finishing.finish`:

1. Publish the step's verdicts and dead letters and wait for every acknowledgement (acks=all,
   idempotent producer). A step's records reach each partition's queue before the next step's, so a
   conversation's verdicts stay in seq order.
2. Wait for the previous step's finish: a step's Redis writes are conditional on the previous step's,
   and its commit must not pass an earlier step's. A failed previous finish fails this one too.
3. Save every session of the step in one Redis transaction (outages are waited out, nothing is
   committed meanwhile), then free the conversations that closed or that another worker moved on.
4. Commit the offsets past the step's last records.

A crash before 4 re-delivers the step. A redelivered event finds its seq below the session's next_seq
and is not applied twice; its verdicts may be published twice and are identified by (conversation_id,
seq, kind). A failed finish voids the steps after it: the worker drops its in-memory sessions and goes
back to the committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer

from processor.engine import AsyncGuardEngine
from processor.events import Verdict, verdict_json
from processor.worker.dlq import DeadLetter
from processor.worker.health import StallWatch
from processor.worker.metrics import WorkerMetrics
from processor.worker.pipeline import SessionCache
from processor.worker.prepare import PreparedStep
from processor.worker.publisher import BatchPublisher
from processor.worker.session_store import SessionStore, SessionUpdate
from processor.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class Finishing:
    """`Worker`'s finish stage (worker.py holds the state it reads)."""

    settings: WorkerSettings
    front: AsyncGuardEngine
    store: SessionStore
    consumer: AIOKafkaConsumer
    publisher: BatchPublisher
    metrics: WorkerMetrics
    sessions: SessionCache
    send_order: asyncio.Lock
    health: StallWatch

    # Of the other stages, which the worker has too.
    _release: Callable[[Iterable[str]], Awaitable[None]]
    with_retry: Callable[[Callable[[], Awaitable[Any]], asyncio.Event, str], Awaitable[Any]]

    async def finish(self, step: PreparedStep, previous: asyncio.Task | None, stop: asyncio.Event) -> None:
        """Publish, save, commit: in that order, and after the previous step's save and commit."""
        try:
            stage, clock = self.metrics.stage_seconds, time.perf_counter
            verdicts = [verdict for outcome in step.outcomes for verdict in outcome.verdicts]
            started = clock()
            await self.publish(verdicts, step.dead_letters)
            published = clock()
            stage.labels("publish").observe(published - started)
            if previous is not None:
                await previous  # raises when it failed: this step is void too
            ordered = clock()
            stage.labels("order").observe(ordered - published)
            updates = [
                SessionUpdate(outcome.before, outcome.session, outcome.fed_token_ids)
                for outcome in step.outcomes
            ]
            conflicts = await self.with_retry(lambda: self.store.save(updates), stop, "save sessions")
            saved = clock()
            stage.labels("save").observe(saved - ordered)
            closed = [session for session in step.cached if session.closed]
            await self.forget([session.conversation_id for session in closed] + conflicts, conflicts)
            self.sessions.drop(conflicts)
            self.sessions.drop_if_unchanged(closed)  # written now; a later step may have moved them on
            # Verdicts acknowledged and sessions durable: only now may these records count as done.
            await self.consumer.commit(step.offsets)
            stage.labels("commit").observe(clock() - saved)
            self.observe(step, verdicts, clock() - step.started)
        finally:
            self.health.step_ended()  # done or failed: either way no longer under way

    async def publish(self, verdicts: list[Verdict], dead_letters: list[DeadLetter]) -> None:
        """Send everything, then wait for every acknowledgement (acks=all, idempotent producer)."""
        async with self.send_order:  # queued whole, in step order (queuing can wait on a partition)
            sends = await self.queue_records(verdicts, dead_letters)
        await asyncio.gather(*sends)

    async def queue_records(
        self, verdicts: list[Verdict], dead_letters: list[DeadLetter]
    ) -> list[asyncio.Future]:
        sends = []
        if verdicts:
            records = [(verdict["conversation_id"].encode(), verdict_json(verdict)) for verdict in verdicts]
            sends += await self.publisher.send(self.settings.verdicts_topic, records)
        if dead_letters:
            letters = [
                ((letter.key or "").encode() or None, letter.model_dump_json().encode())
                for letter in dead_letters
            ]
            sends += await self.publisher.send(self.settings.dlq_topic, letters)
        return sends

    async def forget(self, conversation_ids: list[str], conflicts: list[str]) -> None:
        """Free the GPU state of closed conversations, and of ones another worker moved on."""
        for conversation_id in conflicts:
            log.warning(
                "conversation %r was moved on by another worker; dropping its GPU state", conversation_id
            )
            self.metrics.session_conflicts.inc()
        await self._release(dict.fromkeys(conversation_ids))

    def observe(self, step: PreparedStep, verdicts: list[Verdict], seconds: float) -> None:
        metrics, counts, dead_letters = self.metrics, step.counts, step.dead_letters
        metrics.step_events.observe(counts.events)
        metrics.step_tokens.observe(counts.tokens)
        metrics.tokens.inc(counts.tokens)
        metrics.step_seconds.observe(seconds)
        metrics.events.labels("dead_letter").inc(len(dead_letters))
        metrics.events.labels("duplicate").inc(counts.duplicates)
        metrics.events.labels("applied").inc(counts.applied)
        metrics.dead_letters.inc(len(dead_letters))
        # Counted per kind, not per verdict: a labelled counter's lookup and lock cost ~1 us each.
        for kind, count in Counter(verdict["kind"] for verdict in verdicts).items():
            metrics.verdicts.labels(kind).inc(count)
        metrics.verdict_latency.observe_many(
            [
                verdict["latency_ms"] / 1000.0
                for verdict in verdicts
                if verdict["kind"] == "tokens" and verdict["latency_ms"] is not None
            ]
        )
        for partition, offset in step.offsets.items():
            highwater = self.consumer.highwater(partition)
            if highwater is not None:
                metrics.consumer_lag.labels(str(partition.partition)).set(max(0, highwater - offset))
        metrics.observe_engine(self.front.stats())
