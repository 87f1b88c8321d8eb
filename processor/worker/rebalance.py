"""Which conversations this worker holds, by partition: freed when their partition goes or they idle out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from processor.engine import AsyncGuardEngine
from processor.worker.conversation import ConversationOutcome, Incoming
from processor.worker.pipeline import SessionCache, StepChain
from processor.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How often the loop frees conversations idle past the session TTL.
IDLE_SWEEP_SECONDS = 30.0


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


class Rebalancing:
    """`Worker`'s part in a rebalance and in tracking open conversations (worker.py holds the state).

    aiokafka keeps fetching for the old assignment until the new one lands (assignment() shows the old
    partitions until then) and fetches a partition of the new one from its committed offset, so records
    fetched before a revocation, or while the new assignment is to come, are not this worker's to
    moderate: they come again to whoever owns the partition next. Records of the new assignment are.
    """

    settings: WorkerSettings
    front: AsyncGuardEngine
    chain: StepChain
    sessions: SessionCache
    open: OpenConversations
    step_lock: asyncio.Lock
    _failure: BaseException | None
    _revocations: int
    _awaiting_assignment: bool
    _revoked_since_poll: set[TopicPartition]

    def assignment_epoch(self) -> int | None:
        """Which assignment records fetched now belong to: None while a rebalance is under way (the
        old one's, fetched again by the next owner), else a number that changes at every revocation."""
        return None if self._awaiting_assignment else self._revocations

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

    async def _expire_idle(self) -> None:
        """Idle conversations past the session TTL stop counting against max_conversations."""
        cutoff = time.monotonic() - self.settings.session_ttl
        idle = self.open.idle_since(cutoff)
        await self._release(idle)
        self.sessions.drop(idle)

    async def _release(self, conversation_ids: Iterable[str]) -> None:
        """Free the conversations' engine state and stop counting them as open."""
        for conversation_id in conversation_ids:
            await self.front.release(conversation_id)
            self.open.remove(conversation_id)


class RebalanceListener(ConsumerRebalanceListener):
    """aiokafka's hook, handed to the worker: revocation waits until the steps in flight are committed."""

    def __init__(self, worker: Rebalancing) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self._worker.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        self._worker.on_partitions_assigned(set(assigned))
