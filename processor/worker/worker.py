"""The Kafka loop: token events in, verdict events out, sessions in Redis.

A step is polled, prepared, then finished in the background while the next step is prepared:

    poll:    the records the consumer holds, decoded and planned (and the last step's objects
             freed) while the fetch their drain sets off is in flight; then that fetch's records
             (`poll_records`)
    prepare: records -> decode the rest (bad ones to the DLQ) -> per conversation (unless planned
             during the poll): order by seq, drop what was applied, template and tokenize -> engine
             (all conversations at once, one batched forward) -> verdicts
    finish:  publish verdicts and dead letters (acks from all replicas) -> one Redis transaction for
             every session of the step -> commit the offsets

Why two stages: the finish is mostly waiting (broker acks, Redis, the commit), and the next step's
model run does not need it. Finishes run strictly in step order (`StepChain`): a step's Redis writes
are conditional on the previous step's, and its commit must not pass an earlier step's. The sessions a
step leaves are kept in memory (`SessionCache`), so the next step reads Redis only for conversations
it has not seen; the engine's history reads wait for the finishes in flight (`SettledHistory`).

Delivery: offsets are committed only after the step's verdicts are acknowledged and its sessions are
in Redis, so a crash anywhere re-delivers the step (at least once). A redelivered event finds its seq
below the session's next_seq and is not applied twice; its verdicts may be published twice and are
identified by (conversation_id, seq, kind). A failed finish voids the steps after it: the worker drops
its in-memory sessions and goes back to the committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from processor.engine import AsyncGuardEngine, EngineConfig, GuardEngine, HistoryUnavailableError
from processor.model import GuardModel, load_guard_model
from processor.model.tokenizer import special_token_ids
from processor.worker.conversation import (
    ConversationOutcome,
    ConversationStep,
    Incoming,
    finish_conversation,
    plan_conversation,
    refused,
)
from processor.worker.dlq import DeadLetter, dead_letter
from processor.worker.events import BadTokenEvent, EventLimits, Verdict, decode_token_events, verdict_json
from processor.worker.heap import long_lived_heap_frozen
from processor.worker.http import HealthServer
from processor.worker.metrics import WorkerMetrics
from processor.worker.pipeline import SessionCache, SettledHistory, StepChain
from processor.worker.publisher import BatchPublisher
from processor.worker.session_store import HistoryMissing, Session, SessionStore, SessionUpdate
from processor.worker.settings import WorkerSettings
from processor.worker.template import TurnWriter
from processor.worker.text import IncrementalTokenizer
from processor.worker.verdicts import VerdictConfig

log = logging.getLogger(__name__)

RETRY_BACKOFF_SECONDS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# A step's verdicts for one partition usually fit one produce batch (aiokafka's default is 16 KiB);
# the broker's default limit on a batch is 1 MiB.
PRODUCER_BATCH_BYTES = 512 * 1024
IDLE_SWEEP_SECONDS = 30.0
# How long poll_records lets the loop run before working on the first records. A short sleep, not a
# count of turns: every task the drain and the last step's finish made ready (aiokafka's fetcher, which
# then starts a task that writes the fetch; the producer's sender, with that step's verdicts) runs on to
# its next wait, however many turns that takes, and the loop idles at most this long.
LET_THE_LOOP_RUN_SECONDS = 0.0005


class OpenConversations:
    """Conversations this worker holds GPU state for, by partition, with when each was last seen."""

    def __init__(self) -> None:
        self._partition: dict[str, TopicPartition] = {}
        self._last_seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._partition)

    def __contains__(self, conversation_id: str) -> bool:
        return conversation_id in self._partition

    def touch(self, conversation_id: str, partition: TopicPartition, now: float) -> None:
        self._partition[conversation_id] = partition
        self._last_seen[conversation_id] = now

    def remove(self, conversation_id: str) -> None:
        self._partition.pop(conversation_id, None)
        self._last_seen.pop(conversation_id, None)

    def in_partitions(self, partitions: Iterable[TopicPartition]) -> list[str]:
        wanted = set(partitions)
        return [conversation for conversation, partition in self._partition.items() if partition in wanted]

    def idle_since(self, cutoff: float) -> list[str]:
        return [conversation for conversation, seen in self._last_seen.items() if seen < cutoff]


@dataclass(frozen=True, slots=True)
class StepCounts:
    """What a step's metrics need of its records and plans, counted in prepare."""

    events: int
    tokens: int
    applied: int
    duplicates: int


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


@dataclass
class PreparedStep:
    """A step whose model has run, waiting to publish, save and commit.

    It holds the step's outcomes and offsets, not its records or plans: a step stays in flight for a
    few cycles, and per-event objects kept that long made every young garbage collection walk them
    (~13 objects an event; 50-80 ms pauses at 10,000 events/s, see processor/worker/heap.py).
    """

    outcomes: list[ConversationOutcome]
    cached: list[Session]  # outcomes' sessions as the SessionCache holds them
    dead_letters: list[DeadLetter]
    offsets: dict[TopicPartition, int]  # what to commit: past each partition's last record
    counts: StepCounts
    started: float  # perf_counter at the start of prepare


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        model: GuardModel,
        front: AsyncGuardEngine,
        store: SessionStore,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: WorkerMetrics,
        chain: StepChain | None = None,
    ) -> None:
        self.settings = settings
        self.front = front
        self.store = store
        self.consumer = consumer
        self.publisher = BatchPublisher(producer)
        self.metrics = metrics
        # The engine's history must settle on this same chain (`or` would replace an empty one: len 0).
        self.chain = chain if chain is not None else StepChain(settings.steps_in_flight)
        self.history = SettledHistory(store, self.chain)
        self.sessions = SessionCache()
        # Finishes overlap; a step's records must reach each partition's queue before the next step's
        # (a conversation's verdicts in seq order), and queuing can wait while a partition drains.
        self.send_order = asyncio.Lock()  # FIFO: finishes start, and so queue, in step order
        self._failure: BaseException | None = None  # a finish that failed under the rebalance listener
        tokenizer = model.tokenizer
        special = special_token_ids(tokenizer) if tokenizer is not None else None
        control_ids = (
            frozenset((special.im_start, special.im_end, special.endoftext))
            if special is not None and settings.template == "chat"
            else frozenset()
        )
        self.limits: EventLimits = settings.event_limits(
            model.config.vocab_size, text_allowed=tokenizer is not None, control_ids=control_ids
        )
        self.writer = TurnWriter(
            settings.template, special, IncrementalTokenizer(tokenizer) if tokenizer is not None else None
        )
        self.verdict_config = VerdictConfig(
            model.labels, settings.policy, settings.verdicts, model_name(model)
        )
        self.max_positions = model.max_positions
        self.open = OpenConversations()
        # Held for a whole step; the rebalance listener takes it so that revocation waits for the step
        # in flight to publish, save and commit before the partitions go.
        self.step_lock = asyncio.Lock()
        self.ready = False
        # The last step's records, events and plans, released while the next poll's fetch is in
        # flight: freeing a step's thousands of objects where the loop dropped them took ~10% of its
        # Python time, on the step's critical path (py-spy at 20,000 events/s).
        self._spent: list[object] = []
        # Rebalances, as the poll and prepare must see them. aiokafka keeps fetching for the old
        # assignment until the new one lands (assignment() shows the old partitions until then) and
        # fetches a partition of the new one from its committed offset, so records fetched before a
        # revocation, or while the new assignment is to come, are not this worker's to moderate: they
        # come again to whoever owns the partition next. Records of the new assignment are.
        self._revocations = 0
        self._awaiting_assignment = False
        self._revoked_since_poll: set[TopicPartition] = set()  # since the batch in hand was fetched

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        settings, next_expiry = self.settings, time.monotonic() + IDLE_SWEEP_SECONDS
        interval, next_step = settings.step_interval_ms / 1000.0, 0.0
        try:
            while not stop.is_set():
                if (early := next_step - time.monotonic()) > 0:
                    await asyncio.sleep(early)  # let the next step gather more (--step-interval-ms)
                batch, ahead = await self.poll()
                self.ready = True
                # On a timer, not only when idle: steady traffic must not keep expired sessions counted.
                if time.monotonic() >= next_expiry:
                    await self._expire_idle()
                    next_expiry = time.monotonic() + IDLE_SWEEP_SECONDS
                async with self.step_lock:
                    if not await self._settle(keep=self.chain.depth - 1):
                        continue  # a finish failed: the batch is dropped, its records come again
                    if not batch:
                        continue
                    next_step = time.monotonic() + interval
                    try:
                        prepared = await self.prepare(batch, stop, ahead)
                    except Exception:
                        log.exception("step failed; rewinding to the committed offsets")
                        await self._recover()
                        continue
                    if prepared is not None:
                        self.chain.start(functools.partial(self.finish, prepared, stop=stop))
                    self._spent.append((batch, ahead))
                    batch, ahead, prepared = {}, None, None
        finally:
            await self.chain.wait()  # stopping: what was prepared is published, saved and committed

    async def poll(self) -> tuple[dict[TopicPartition, list[ConsumerRecord]], DecodedAhead | None]:
        """A step's records, the first of them decoded and planned while the fresh fetch is in flight
        (the loop would only wait for it: ~6 ms a step at 10,000 events/s)."""
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
        self._revoked_since_poll = set()  # the batch is of the assignment in force now
        self.release_spent()  # when there was no fetch to wait for
        return batch, (ahead if batch else None)

    def assignment_epoch(self) -> int | None:
        """Which assignment records fetched now belong to: None while a rebalance is under way (the
        old one's, fetched again by the next owner), else a number that changes at every revocation."""
        return None if self._awaiting_assignment else self._revocations

    def release_spent(self) -> None:
        """Free the last step's records, events and plans (the poll does, while its fetch is in flight)."""
        self._spent.clear()

    async def _settle(self, keep: int) -> bool:
        """Let at most `keep` finishes stay in flight; on a failure, recover and say False."""
        started = time.perf_counter()
        failure = await self.chain.wait(keep) or self._failure
        self.metrics.stage_seconds.labels("wait").observe(time.perf_counter() - started)
        self._failure = None
        if failure is None:
            return True
        log.error("step failed; rewinding to the committed offsets", exc_info=failure)
        await self._recover()
        return False

    async def _recover(self) -> None:
        """Nothing of the failed steps was committed: forget what memory holds ahead of Redis (the
        engine truncates to what Redis says on the next submission) and redo from the commits."""
        self.metrics.step_failures.inc()
        await self.chain.wait()
        self.sessions.clear()
        await asyncio.sleep(RETRY_BACKOFF_SECONDS[-1])
        await self._rewind()

    async def _rewind(self) -> None:
        """Back to the committed offsets; while Kafka itself is away, keep trying rather than exit."""
        for delay in (*RETRY_BACKOFF_SECONDS, *[RETRY_BACKOFF_SECONDS[-1]] * 60):
            try:
                committed = await self.consumer.seek_to_committed()
                # aiokafka leaves a partition with no committed offset (or 0) where it is, which would
                # skip the failed records: those go back to the start, as a restart would (earliest).
                never_committed = [partition for partition, offset in committed.items() if not offset]
                if never_committed:
                    await self.consumer.seek_to_beginning(*never_committed)
                return
            except Exception as error:  # any client error: the broker is unreachable or moving
                log.warning("rewind to committed offsets failed (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
        raise RuntimeError("could not rewind to the committed offsets for 5 minutes; giving up")

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

    async def finish(self, step: PreparedStep, previous: asyncio.Task | None, stop: asyncio.Event) -> None:
        """Publish, save, commit: in that order, and after the previous step's save and commit."""
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
            SessionUpdate(outcome.before, outcome.session, outcome.fed_token_ids) for outcome in step.outcomes
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

    async def sessions_for(self, conversation_ids: list[str], stop: asyncio.Event) -> dict[str, Session]:
        """Sessions from memory where a recent step left them, the rest from Redis in one round trip."""
        found = {conversation_id: self.sessions.get(conversation_id) for conversation_id in conversation_ids}
        missing = [conversation_id for conversation_id, session in found.items() if session is None]
        if missing:
            loaded = await self.with_retry(lambda: self.store.load_sessions(missing), stop, "load sessions")
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

    async def _release(self, conversation_ids: Iterable[str]) -> None:
        """Free the conversations' engine state and stop counting them as open."""
        for conversation_id in conversation_ids:
            await self.front.release(conversation_id)
            self.open.remove(conversation_id)

    def track(
        self,
        incoming: dict[str, list[Incoming]],
        outcomes: list[ConversationOutcome],
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        """Remember which partition each open conversation came from (revocation frees them)."""
        now = time.monotonic()
        # The batch's own partition keys: a TopicPartition made per conversation cost ~0.5 us each.
        partitions = {(partition.topic, partition.partition): partition for partition in batch}
        for outcome in outcomes:
            conversation_id = outcome.session.conversation_id
            if not outcome.closed:
                record = incoming[conversation_id][0].source
                self.open.touch(conversation_id, partitions[record.topic, record.partition], now)

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

    # -- around the step ------------------------------------------------------------------------

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

    async def with_retry(self, call, stop: asyncio.Event, what: str):
        """Redis outages are waited out (issue 6): nothing is committed until the call succeeds."""
        attempt = 0
        while True:
            try:
                result = await call()
            except (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError) as error:
                if stop.is_set() and attempt >= len(RETRY_BACKOFF_SECONDS):
                    raise
                delay = RETRY_BACKOFF_SECONDS[min(attempt, len(RETRY_BACKOFF_SECONDS) - 1)]
                log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
                self.ready = False
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.ready = True
            return result

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # First, before any wait: a poll that returns from here on fetched for the old assignment.
        self._revocations += 1
        self._awaiting_assignment = True
        self._revoked_since_poll |= revoked
        async with self.step_lock:  # the steps in flight publish, save and commit first
            failure = await self.chain.wait()
            if failure is not None:  # the main loop rewinds; memory is ahead of Redis everywhere
                self._failure = failure
                self.sessions.clear()
            leaving = self.open.in_partitions(revoked)
            await self._release(leaving)
            self.sessions.drop(leaving)  # the new owner may move them on
        log.info("partitions revoked: %s", sorted(partition.partition for partition in revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._awaiting_assignment = False
        log.info("partitions assigned: %s", sorted(partition.partition for partition in assigned))

    async def _expire_idle(self) -> None:
        """Idle conversations past the session TTL stop counting against max_conversations."""
        cutoff = time.monotonic() - self.settings.session_ttl
        idle = self.open.idle_since(cutoff)
        await self._release(idle)
        self.sessions.drop(idle)


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self._worker.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        self._worker.on_partitions_assigned(set(assigned))


def model_name(model: GuardModel) -> str:
    """What verdicts name: a hub id as given, a local checkpoint by its folder name."""
    return Path(model.name).name if Path(model.name).is_dir() else model.name


# -- assembly -------------------------------------------------------------------------------------


async def ensure_topics(settings: WorkerSettings) -> None:
    """Create the topics that are missing; existing topics are never altered."""
    admin = AIOKafkaAdminClient(**settings.kafka_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication_factor)
            for name in (settings.tokens_topic, settings.verdicts_topic, settings.dlq_topic)
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker created it first
                await admin.create_topics(missing)
            log.info("created topics %s", [topic.name for topic in missing])
    finally:
        await admin.close()


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
    a whole step more (`--fresh-fetch-ms`; measured in bench/README.md, "Sixth session: the fresh fetch")."""
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


def engine_config(settings: WorkerSettings) -> EngineConfig:
    return EngineConfig(
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_fraction=None if settings.kv_cache_bytes else settings.kv_cache_fraction,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_conversations=settings.max_batch_conversations,
        attention_backend=settings.attention_backend,
        kv_cache_dtype=settings.kv_cache_dtype,
    )


async def serve(
    settings: WorkerSettings, model: GuardModel | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run a worker until `stop` is set (SIGTERM in the CLI): the step in flight finishes, publishes and
    commits, then everything is closed."""
    stop = stop or asyncio.Event()
    log.info("worker settings: %s", settings.redacted())
    if model is None:
        model = load_guard_model(settings.model, settings.device, settings.dtype)
    if model.device.type == "cpu":
        torch.set_num_threads(settings.cpu_threads or max(1, (os.cpu_count() or 2) // 2))
    metrics = WorkerMetrics()
    redis = Redis.from_url(settings.redis_url, **settings.redis_options())
    store = SessionStore(
        redis, settings.redis_key_prefix, settings.session_ttl, settings.ended_session_ttl, settings.worker_id
    )
    chain = StepChain(settings.steps_in_flight)
    engine = GuardEngine(model, engine_config(settings))
    front = AsyncGuardEngine(engine, history=SettledHistory(store, chain))
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(
        **settings.kafka_options(),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        **settings.kafka_options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_batch_size=PRODUCER_BATCH_BYTES,
    )
    worker = Worker(settings, model, front, store, consumer, producer, metrics, chain)
    http = HealthServer(metrics.registry, lambda: worker.ready)
    with long_lived_heap_frozen():  # the model's and libraries' objects: never walked again
        try:
            if settings.http_port:
                await http.start(settings.http_port)
            await producer.start()
            await consumer.start()
            consumer.subscribe([settings.tokens_topic], listener=_RebalanceListener(worker))
            await worker.run(stop)
        finally:
            worker.ready = False
            # Leaving the group after the last commit: the partitions move without a redelivery.
            await consumer.stop()
            await producer.stop()
            await front.close()
            await redis.aclose()
            await http.stop()
