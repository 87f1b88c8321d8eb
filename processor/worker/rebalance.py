"""Which conversations this worker holds, by partition: freed when their partition goes or they idle out.

A rebalance revokes every partition (aiokafka's protocol is eager) and then assigns, and some come
back to the same worker. So a revocation keeps the engine state of its conversations and the
assignment frees those whose partition went elsewhere. A conversation kept over a rebalance is checked
on its next load from Redis: if another worker wrote its session since (it was this worker's
partition, but the group had dropped this worker meanwhile), its engine state is freed and rebuilt
from the history.
"""

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
from processor.worker.session_store import Session
from processor.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How often the loop frees conversations idle past the session TTL.
IDLE_SWEEP_SECONDS = 30.0


class OpenConversations:
    """Conversations this worker holds GPU state for, by partition, with when each was last seen."""

    def __init__(self) -> None:
        self._partition: dict[str, TopicPartition] = {}
        self._last_seen: dict[str, float] = {}
        self._held_over: set[str] = set()  # kept over a revocation, not yet checked against Redis

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
        self._held_over.discard(conversation_id)

    def hold_over(self, conversation_ids: Iterable[str]) -> None:
        self._held_over.update(conversation_ids)

    def held_over_elsewhere(self, assigned: Iterable[TopicPartition]) -> list[str]:
        """The conversations held over whose partition the new assignment gave another worker."""
        assigned = set(assigned)
        return [c for c in self._held_over if self._partition.get(c) not in assigned]

    def take_held_over(self, conversation_ids: Iterable[str]) -> list[str]:
        """Those of `conversation_ids` held over a rebalance; from now on they are not."""
        taken = self._held_over.intersection(conversation_ids)
        self._held_over -= taken
        return list(taken)

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
            revoked_conversations = self.open.in_partitions(revoked)
            self.sessions.drop(revoked_conversations)  # the next owner may move them on
            self.open.hold_over(revoked_conversations)  # their engine state waits for the assignment
        log.info("partitions revoked: %s", sorted(partition.partition for partition in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._awaiting_assignment = False
        async with self.step_lock:
            await self._release(self.open.held_over_elsewhere(assigned))
        log.info("partitions assigned: %s", sorted(partition.partition for partition in assigned))

    async def release_moved_on(self, sessions: dict[str, Session]) -> None:
        """Of conversations held over a rebalance, free the engine state of those that another worker
        has written since: the history in Redis, not this engine, has their latest tokens."""
        for conversation_id in self.open.take_held_over(sessions):
            if sessions[conversation_id].owner != self.settings.worker_id:
                await self.front.release(conversation_id)

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
        await self._worker.on_partitions_assigned(set(assigned))
