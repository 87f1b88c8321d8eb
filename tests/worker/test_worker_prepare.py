"""A prepared step (its model run, waiting to publish, save and commit) keeps what its finish needs
and none of its records: steps stay in flight for a few cycles, and per-event objects kept that long
made the garbage collector's young collections walk tens of thousands of them (long pauses). And a
step whose first records were decoded (and planned) during the poll is the step prepared whole."""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass

from aiokafka import TopicPartition

from processor.engine import AsyncGuardEngine, GuardEngine
from processor.model import load_guard_model
from processor.worker import prepare as prepare_module
from processor.worker.metrics import WorkerMetrics
from processor.worker.prepare import StepCounts
from processor.worker.serve import engine_config
from processor.worker.session_store import Session
from processor.worker.settings import WorkerSettings
from processor.worker.worker import Worker

from .fakes import ScriptedConsumer

TOPIC = TopicPartition("guard.tokens", 0)
OTHER = TopicPartition("guard.tokens", 1)


@dataclass
class Record:
    """What `Worker.prepare` reads of an aiokafka ConsumerRecord (this one can be weakly referenced)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0


def token_event(conversation_id: str, seq: int, offset: int, partition: TopicPartition = TOPIC) -> Record:
    value = {"conversation_id": conversation_id, "seq": seq, "role": "assistant", "token_ids": [1000, 1001]}
    key, encoded = conversation_id.encode(), json.dumps(value).encode()
    return Record(partition.topic, partition.partition, offset, key, encoded)


def tiny_worker(tiny_model_dir, consumer, conversations: str) -> tuple[Worker, AsyncGuardEngine]:
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    settings = WorkerSettings(model=str(tiny_model_dir), template="raw", kv_cache_bytes=4 * 1024 * 1024)
    front = AsyncGuardEngine(GuardEngine(model, engine_config(settings)))
    worker = Worker(settings, model, front, None, consumer, None, WorkerMetrics())  # type: ignore[arg-type]
    for conversation_id in conversations:
        worker.sessions.put(Session(conversation_id, stored=True))  # no Redis: sessions start here
    return worker, front


def answered(prepared) -> list[tuple]:
    """What a prepared step says, conversation by conversation, in a comparable form."""
    verdicts = [verdict for outcome in prepared.outcomes for verdict in outcome.verdicts]
    return sorted(
        (v["conversation_id"], v["seq"], v["kind"], [(t["position"], t["risk_level"]) for t in v["tokens"]])
        for v in verdicts
    )


async def test_a_prepared_step_keeps_its_offsets_and_counts_not_its_records(tiny_model_dir):
    worker, front = tiny_worker(tiny_model_dir, ScriptedConsumer(assigned={TOPIC}), "ab")
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
        worker.release_spent()  # what the next poll does while its fetch is in flight
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


class WatchedConsumer(ScriptedConsumer):
    """Says, at each getmany, which of `watched` are still alive."""

    def __init__(self, *answers: dict, assigned, watched: list[weakref.ref]) -> None:
        super().__init__(*answers, assigned=assigned)
        self.watched, self.alive_at_call = watched, []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.alive_at_call.append(sum(ref() is not None for ref in self.watched))
        return await super().getmany(timeout_ms, max_records)


async def test_the_next_poll_frees_a_step_while_its_fetch_is_in_flight(tiny_model_dir):
    """A step's records, events and plans outlive prepare (freeing them is work for the loop's idle
    time), and are gone by the time the next poll waits for its fresh fetch: not held any longer."""
    records = [token_event("a", seq, 40 + seq) for seq in range(3)]
    watched = [weakref.ref(record) for record in records]
    consumer = WatchedConsumer({TOPIC: [token_event("a", 3, 43)]}, assigned={TOPIC}, watched=watched)
    worker, front = tiny_worker(tiny_model_dir, consumer, "a")
    try:
        prepared = await worker.prepare({TOPIC: records}, asyncio.Event())
        del records
        assert prepared is not None and sum(ref() is not None for ref in watched) == 3
        await worker.poll()
        assert consumer.alive_at_call == [3, 0]  # the first getmany, then the fresh fetch's
    finally:
        await front.close()


async def test_records_decoded_during_the_poll_make_the_step_decoded_whole(tiny_model_dir):
    """The first getmany's records are decoded while the fresh fetch is in flight; the step they make
    with the fetch's records is the one decoding them all in prepare makes (a redelivery included)."""
    order = [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 0)]
    records = [token_event(c, seq, offset) for offset, (c, seq) in enumerate(order, start=40)]
    whole_worker, whole_front = tiny_worker(tiny_model_dir, ScriptedConsumer(assigned={TOPIC}), "ab")
    polled = ScriptedConsumer({TOPIC: records[:3]}, {TOPIC: records[3:]}, assigned={TOPIC})
    ahead_worker, ahead_front = tiny_worker(tiny_model_dir, polled, "ab")
    try:
        whole = await whole_worker.prepare({TOPIC: list(records)}, asyncio.Event())
        batch, ahead = await ahead_worker.poll()
        assert ahead is not None and ahead.counts == {TOPIC: 3}  # decoded before the second getmany
        split = await ahead_worker.prepare(batch, asyncio.Event(), ahead)
        assert whole is not None and split is not None
        assert answered(split) == answered(whole) and len(answered(whole)) == 5
        assert (split.offsets, split.counts) == (whole.offsets, whole.counts)
    finally:
        await whole_front.close()
        await ahead_front.close()


async def test_records_polled_before_a_revocation_are_not_moderated_even_if_the_partition_comes_back(
    tiny_model_dir,
):
    """A rebalance between the poll and prepare: consumer.assignment() still lists the old partitions
    until the new assignment lands, and a partition assigned back is fetched again from its committed
    offset. Either way the polled records are not this step's (moderating them published verdicts
    twice in a 1 -> 3 -> 1 scale test); a poll during the rebalance is not trusted either."""

    def first() -> dict:  # a fresh answer each time: the poll extends the lists it is given
        return {TOPIC: [token_event("a", 0, 10)]}

    def more() -> dict:
        return {TOPIC: [token_event("a", 1, 11)]}

    # The poll during the rebalance stops at its first getmany (the old assignment's records).
    polls = ScriptedConsumer(first(), more(), first(), first(), assigned={TOPIC})
    worker, front = tiny_worker(tiny_model_dir, polls, "a")
    try:
        batch, ahead = await worker.poll()
        await worker.on_partitions_revoked({TOPIC})  # assignment() still says TOPIC, as aiokafka's does
        assert await worker.prepare(batch, asyncio.Event(), ahead) is None
        batch, ahead = await worker.poll()  # during the rebalance
        await worker.on_partitions_assigned({TOPIC})
        assert await worker.prepare(batch, asyncio.Event(), ahead) is None
        batch, ahead = await worker.poll()  # after it: a step again
        prepared = await worker.prepare(batch, asyncio.Event(), ahead)
        assert prepared is not None and [(c, seq) for c, seq, _, _ in answered(prepared)] == [("a", 0)]
    finally:
        await front.close()


async def test_records_fetched_after_a_rebalance_that_began_during_the_poll_are_moderated(tiny_model_dir):
    """A partition revoked and assigned back while the poll's getmany waits: what getmany returns then
    is the new assignment's, from the committed offset; dropping it would lose it (a CI run of a
    1 -> 3 -> 1 scale test and of a worker kill saw a seq gap: one event never moderated)."""
    worker: Worker

    async def rebalance_then_fetch() -> dict:
        await worker.on_partitions_revoked({TOPIC})
        await worker.on_partitions_assigned({TOPIC})
        return {TOPIC: [token_event("a", 0, 10)]}

    polls = ScriptedConsumer(rebalance_then_fetch, {TOPIC: [token_event("a", 1, 11)]}, assigned={TOPIC})
    worker, front = tiny_worker(tiny_model_dir, polls, "a")
    try:
        batch, ahead = await worker.poll()
        prepared = await worker.prepare(batch, asyncio.Event(), ahead)
        assert prepared is not None and prepared.offsets == {TOPIC: 12}
        assert [(c, seq) for c, seq, _, _ in answered(prepared)] == [("a", 0), ("a", 1)]
    finally:
        await front.close()


async def test_a_partition_gone_since_the_poll_takes_its_early_records_with_it(tiny_model_dir):
    """Records decoded during the poll from a partition revoked before prepare are not moderated (their
    new owner does that); the step is the kept partition's records, decoded afresh."""
    first = {TOPIC: [token_event("a", 0, 10)], OTHER: [token_event("b", 0, 20, OTHER)]}
    more = {OTHER: [token_event("b", 1, 21, OTHER)]}
    worker, front = tiny_worker(tiny_model_dir, ScriptedConsumer(first, more, assigned={OTHER}), "ab")
    try:
        batch, ahead = await worker.poll()
        assert ahead is not None and ahead.counts == {TOPIC: 1, OTHER: 1}
        prepared = await worker.prepare(batch, asyncio.Event(), ahead)
        assert prepared is not None and prepared.offsets == {OTHER: 22}
        assert [(c, seq) for c, seq, _, _ in answered(prepared)] == [("b", 0), ("b", 1)]
        assert prepared.dead_letters == []
    finally:
        await front.close()


async def test_a_plan_made_during_the_poll_is_kept_only_while_its_session_and_events_hold(
    tiny_model_dir, monkeypatch
):
    """Conversations whose events all came with the first getmany are planned during the poll, and not
    again; one that got an event more from the fresh fetch, or whose session in memory changed since,
    is planned afresh (a plan is a pure function of the session and the events)."""
    first = {TOPIC: [token_event("a", 0, 10), token_event("b", 0, 11), token_event("c", 0, 12)]}
    more = {TOPIC: [token_event("b", 1, 13)]}
    worker, front = tiny_worker(tiny_model_dir, ScriptedConsumer(first, more, assigned={TOPIC}), "abc")
    planned: list[str] = []
    plan = prepare_module.plan_conversation

    def counted(session, items, *rest):
        planned.append(session.conversation_id)
        return plan(session, items, *rest)

    monkeypatch.setattr(prepare_module, "plan_conversation", counted)
    try:
        batch, ahead = await worker.poll()
        assert ahead is not None and sorted(planned) == ["a", "b", "c"]
        worker.sessions.put(Session("c", stored=True, next_seq=1, length=3))  # as a later step may leave it
        planned.clear()
        prepared = await worker.prepare(batch, asyncio.Event(), ahead)
        assert sorted(planned) == ["b", "c"]
        assert prepared is not None and prepared.counts.duplicates == 1  # c's seq 0, per its new session
        assert [(c, seq) for c, seq, _, _ in answered(prepared)] == [("a", 0), ("b", 0), ("b", 1)]
    finally:
        await front.close()


async def test_a_failure_while_working_ahead_leaves_the_step_to_prepare(tiny_model_dir, monkeypatch):
    """An unexpected error while decoding or planning during the poll does not escape the loop: the
    poll hands over no early work, and prepare does it all under the step's own failure handling."""
    first, more = {TOPIC: [token_event("a", 0, 10)]}, {TOPIC: [token_event("a", 1, 11)]}
    worker, front = tiny_worker(tiny_model_dir, ScriptedConsumer(first, more, assigned={TOPIC}), "a")
    decode = worker.decode
    calls = iter([RuntimeError("a bug"), None])

    def fails_once(records, ahead=None):
        if (error := next(calls, None)) is not None:
            raise error
        return decode(records, ahead)

    monkeypatch.setattr(worker, "decode", fails_once)
    try:
        batch, ahead = await worker.poll()
        assert ahead is None and [record.offset for record in batch[TOPIC]] == [10, 11]
        prepared = await worker.prepare(batch, asyncio.Event(), ahead)
        assert prepared is not None
        assert [(c, seq) for c, seq, _, _ in answered(prepared)] == [("a", 0), ("a", 1)]
    finally:
        await front.close()


async def test_a_rebalance_keeps_the_engine_state_of_conversations_whose_partition_returns(tiny_model_dir):
    """Revocation keeps every conversation's engine state; the assignment frees those of partitions that
    went elsewhere; a kept one is freed when Redis shows another worker wrote it since."""
    records = {
        TOPIC: [token_event("a", 0, 10), token_event("c", 0, 11)],
        OTHER: [token_event("b", 0, 20, OTHER)],
    }
    worker, front = tiny_worker(tiny_model_dir, ScriptedConsumer(assigned={TOPIC, OTHER}), "abc")
    try:
        prepared = await worker.prepare(records, asyncio.Event())
        assert prepared is not None
        held = {c: front.engine.next_position(c) for c in "abc"}
        assert all(held.values())
        await worker.on_partitions_revoked({TOPIC, OTHER})
        assert {c: front.engine.next_position(c) for c in "abc"} == held  # kept until the assignment
        await worker.on_partitions_assigned({TOPIC})
        await front.moderate("z", [1000], 0)  # queued after the releases: answered once they are applied
        assert front.engine.next_position("b") is None  # its partition went to another worker
        assert front.engine.next_position("a") == held["a"]
        mine = Session("a", stored=True, owner=worker.settings.worker_id)
        await worker.release_moved_on({"a": mine, "c": Session("c", stored=True, owner="another")})
        await front.moderate("z", [1001], 1)
        assert front.engine.next_position("a") == held["a"]  # this worker wrote it last: still good
        assert front.engine.next_position("c") is None  # another worker moved it on: rebuilt next time
    finally:
        await front.close()
