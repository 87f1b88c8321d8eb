"""Preparing a step: records -> token events -> sessions -> plans -> one engine submission -> verdicts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from processor.engine import AsyncGuardEngine, HistoryUnavailableError
from processor.events import BadTokenEvent, EventLimits, decode_token_events
from processor.worker.conversation import (
    ConversationOutcome,
    ConversationStep,
    Incoming,
    finish_conversation,
    plan_conversation,
    refused,
)
from processor.worker.dlq import DeadLetter, dead_letter
from processor.worker.fetch import DecodedAhead
from processor.worker.metrics import WorkerMetrics
from processor.worker.pipeline import SessionCache, SettledHistory
from processor.worker.rebalance import OpenConversations
from processor.worker.session_store import HistoryMissing, Session, SessionStore
from processor.worker.settings import WorkerSettings
from processor.worker.template import TurnWriter
from processor.worker.verdicts import VerdictConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepCounts:
    """What a step's metrics need of its records and plans, counted in prepare."""

    events: int
    tokens: int
    applied: int
    duplicates: int


@dataclass
class PreparedStep:
    """A step whose model has run, waiting to publish, save and commit.

    It holds the step's outcomes and offsets, not its records or plans: a step stays in flight for a
    few cycles, and every young garbage collection would walk the per-event objects kept that long
    (see processor/heap.py).
    """

    outcomes: list[ConversationOutcome]
    cached: list[Session]  # outcomes' sessions as the SessionCache holds them
    dead_letters: list[DeadLetter]
    offsets: dict[TopicPartition, int]  # what to commit: past each partition's last record
    counts: StepCounts
    started: float  # perf_counter at the start of prepare


class Preparing:
    """`Worker`'s prepare stage: everything of a step but what leaves the process (worker.py holds the
    state it reads)."""

    settings: WorkerSettings
    front: AsyncGuardEngine
    store: SessionStore
    consumer: AIOKafkaConsumer
    metrics: WorkerMetrics
    history: SettledHistory
    sessions: SessionCache
    open: OpenConversations
    limits: EventLimits
    writer: TurnWriter
    verdict_config: VerdictConfig
    max_positions: int
    _spent: list[object]
    _revoked_since_poll: set[TopicPartition]

    # Of the other stages, which the worker has too.
    track: Callable[..., None]
    with_retry: Callable[[Callable[[], Awaitable[Any]], asyncio.Event, str], Awaitable[Any]]
    release_moved_on: Callable[[dict[str, Session]], Awaitable[None]]

    async def prepare(
        self,
        batch: dict[TopicPartition, list[ConsumerRecord]],
        stop: asyncio.Event,
        ahead: DecodedAhead | None = None,
    ) -> PreparedStep | None:
        """Decode (what `ahead` has not), plan and moderate a batch: everything of a step but what
        leaves the process."""
        started = time.perf_counter()
        # A rebalance may have taken partitions since the poll: their next owner handles them (this
        # worker too, fetching them again from the committed offsets, if they come back here).
        assigned, revoked = self.consumer.assignment(), self._revoked_since_poll
        batch = {
            partition: records
            for partition, records in batch.items()
            if partition in assigned and partition not in revoked
        }
        if not any(batch.values()):
            return None
        if ahead is not None and not ahead.counts.keys() <= batch.keys():
            ahead = None  # some of it came from a partition that went: decode what is left afresh
        done = ahead.counts if ahead is not None else {}
        rest = [record for p, records in batch.items() for record in records[done.get(p, 0) :]]
        incoming, dead_letters = self.decode(rest, ahead)
        decoded = time.time()
        self.metrics.event_age.observe_many(
            [
                decoded - item.sent_at
                for items in incoming.values()
                for item in items
                if item.sent_at is not None
            ]
        )
        sessions = await self.sessions_for(list(incoming), stop)
        planned = ahead.planned if ahead is not None else {}
        steps = [
            self.plan(sessions[conversation_id], items, planned.get(conversation_id))
            for conversation_id, items in incoming.items()
        ]
        dead_letters += self.rejected(steps)
        engine_started = time.perf_counter()
        outcomes = await self.moderate([step for step in steps if step.changed])
        stage = self.metrics.stage_seconds
        stage.labels("engine").observe(time.perf_counter() - engine_started)
        self.track(incoming, outcomes, batch)
        self._spent.append((incoming, steps))  # freed in the next poll's wait, not on return
        stage.labels("prepare").observe(time.perf_counter() - started)
        return PreparedStep(
            outcomes=outcomes,
            cached=[self.sessions.put(outcome.session) for outcome in outcomes],
            dead_letters=dead_letters,
            offsets={partition: records[-1].offset + 1 for partition, records in batch.items()},
            counts=StepCounts(
                events=sum(len(records) for records in batch.values()),
                tokens=sum(len(step.token_ids) for step in steps),
                applied=sum(len(step.planned) for step in steps),
                duplicates=sum(step.duplicates for step in steps),
            ),
            started=started,
        )

    async def sessions_for(self, conversation_ids: list[str], stop: asyncio.Event) -> dict[str, Session]:
        """Sessions from memory where a recent step left them, the rest from Redis in one round trip."""
        found = {conversation_id: self.sessions.get(conversation_id) for conversation_id in conversation_ids}
        missing = [conversation_id for conversation_id, session in found.items() if session is None]
        if missing:
            loaded = await self.with_retry(lambda: self.store.load_sessions(missing), stop, "load sessions")
            await self.release_moved_on(loaded)
            found.update(loaded)
        return found  # type: ignore[return-value]

    # -- the step's parts, in order -------------------------------------------------------------

    def decode(
        self, records: list[ConsumerRecord], ahead: DecodedAhead | None = None
    ) -> tuple[dict[str, list[Incoming]], list[DeadLetter]]:
        """Token events by conversation, and the dead letters; continuing what `ahead` decoded."""
        incoming: dict[str, list[Incoming]] = ahead.incoming if ahead is not None else {}
        dead_letters: list[DeadLetter] = ahead.dead_letters if ahead is not None else []
        max_conversations, open_conversations = self.settings.max_conversations, self.open
        decoded = decode_token_events([(record.key, record.value) for record in records], self.limits)
        for record, event in zip(records, decoded, strict=True):
            if isinstance(event, BadTokenEvent):
                dead_letters.append(self.dead_letter(record, event.reason))
                continue
            conversation_id = event.conversation_id
            items = incoming.get(conversation_id)
            if items is None:
                # New conversations of this batch count too: one batch of fresh ids must not pass the cap.
                if (
                    conversation_id not in open_conversations
                    and len(open_conversations) + len(incoming) >= max_conversations
                ):
                    reason = f"worker holds its limit of {max_conversations} open conversations"
                    dead_letters.append(self.dead_letter(record, reason))
                    continue
                items = incoming[conversation_id] = []
            sent_at = event.ts if event.ts is not None else record.timestamp / 1000.0
            items.append(Incoming(event, sent_at, record))
        return incoming, dead_letters

    def plan(
        self, session: Session, items: list[Incoming], ahead: tuple[ConversationStep, int] | None = None
    ) -> ConversationStep:
        """The conversation's share of the step; the one planned during the poll if it still holds."""
        if ahead is not None and ahead[0].session is session and ahead[1] == len(items):
            return ahead[0]
        return plan_conversation(session, items, self.writer, self.max_positions)

    def rejected(self, steps: list[ConversationStep]) -> list[DeadLetter]:
        return [self.dead_letter(item.source, reason) for step in steps for item, reason in step.rejected]

    async def moderate(self, steps: list[ConversationStep]) -> list[ConversationOutcome]:
        """Every conversation of a step through the engine in one submission, then its verdicts."""
        runs = [step for step in steps if step.token_ids]
        answers = iter(
            await self.front.moderate_many([(s.conversation_id, s.token_ids, s.session.length) for s in runs])
        )
        now = time.time()
        outcomes = []
        for step in steps:
            result = next(answers) if step.token_ids else None  # nothing to run: verdicts alone
            if isinstance(result, HistoryUnavailableError):
                outcomes.append(await self.history_unavailable(step, result, now))
            elif isinstance(result, Exception):
                raise result
            else:
                outcomes.append(finish_conversation(step, result, self.verdict_config, now))
        return outcomes

    async def history_unavailable(
        self, step: ConversationStep, error: HistoryUnavailableError, now: float
    ) -> ConversationOutcome:
        if not await self.history_lost(step):
            # Redis did not answer the engine's history read: fail the step, it is redone from the
            # committed offsets (closing the conversation over an outage would end it for good).
            raise error
        log.warning("%s", error)
        message = "the conversation's token history is gone from Redis (expired or lost); it is closed"
        return refused(step, message, self.verdict_config, now)

    async def history_lost(self, step: ConversationStep) -> bool:
        """The engine cannot tell a history gone from Redis from a Redis that did not answer: ask again."""
        try:
            await self.history.load(step.conversation_id, step.session.length)
        except HistoryMissing:
            return True
        except Exception:
            return False
        return False

    def dead_letter(self, record: ConsumerRecord, reason: str) -> DeadLetter:
        log.info("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        return dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            reason,
            self.settings.worker_id,
        )
