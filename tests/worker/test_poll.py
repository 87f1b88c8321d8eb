"""A step's poll: the consumer's held records, then those of the fetch the drain sets off (pure logic,
a scripted consumer; the pipeline benchmark measures what it does to latency against a real broker)."""

from __future__ import annotations

from typing import NamedTuple

from aiokafka import TopicPartition

from processor.worker.fetch import poll_records

from .fakes import ScriptedConsumer

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Record(NamedTuple):
    offset: int


class Rebalances:
    """The worker's assignment epochs as a rebalance moves through them (None: under way)."""

    def __init__(self) -> None:
        self.epoch: int | None = 0

    def __call__(self) -> int | None:
        return self.epoch

    def during_fetch(self, epoch: int | None, records: dict):
        async def fetch() -> dict:
            self.epoch = epoch
            return records

        return fetch


async def test_the_fresh_fetch_joins_the_step_after_the_held_records():
    consumer = ScriptedConsumer({P0: ["a0", "a1"]}, {P0: ["a2"], P1: ["b0"]})
    batch = await poll_records(consumer, timeout_ms=100, max_records=10, fresh_fetch_ms=5)
    assert batch == {P0: ["a0", "a1", "a2"], P1: ["b0"]}  # per partition in offset order
    assert consumer.calls == [(100, 10), (5, 8)]  # the second asks for what is left of the step's cap


async def test_no_second_poll_when_the_first_found_nothing_filled_the_step_or_it_is_off():
    idle = ScriptedConsumer({})
    assert await poll_records(idle, timeout_ms=100, max_records=10, fresh_fetch_ms=5) == {}
    full = ScriptedConsumer({P0: ["a0", "a1"]}, {P0: ["a2"]})
    assert await poll_records(full, timeout_ms=100, max_records=2, fresh_fetch_ms=5) == {P0: ["a0", "a1"]}
    off = ScriptedConsumer({P0: ["a0"]}, {P0: ["a1"]})
    assert await poll_records(off, timeout_ms=100, max_records=10, fresh_fetch_ms=0) == {P0: ["a0"]}
    assert [len(consumer.calls) for consumer in (idle, full, off)] == [1, 1, 1]


async def test_the_held_records_are_handed_over_while_the_fresh_fetch_is_in_flight():
    consumer = ScriptedConsumer({P0: ["a0", "a1"]}, {P0: ["a2"]})
    seen = []

    def while_fetching(first: dict) -> None:
        seen.append(({partition: list(records) for partition, records in first.items()}, len(consumer.calls)))

    batch = await poll_records(consumer, 100, max_records=10, fresh_fetch_ms=5, while_fetching=while_fetching)
    assert seen == [({P0: ["a0", "a1"]}, 1)]  # after the first getmany, before the second
    assert batch == {P0: ["a0", "a1", "a2"]}
    nothing_more = ScriptedConsumer({P0: ["a0"]})
    seen.clear()
    await poll_records(nothing_more, 100, max_records=1, fresh_fetch_ms=5, while_fetching=seen.append)
    assert seen == []  # no fresh fetch (the step is full): the step's preparation decodes everything


async def test_records_fetched_while_a_rebalance_is_under_way_are_not_a_step():
    """They are the old assignment's: aiokafka fetches the partitions of the new one from their
    committed offsets, for whoever owns them next."""
    rebalances = Rebalances()
    first_under_way = ScriptedConsumer(rebalances.during_fetch(None, {P0: [Record(7)]}), {P0: [Record(8)]})
    assert await poll_records(first_under_way, 100, 10, 5, assignment_epoch=rebalances) == {}
    assert len(first_under_way.calls) == 1 and first_under_way.seeks == []
    rebalances.epoch = 0
    second_under_way = ScriptedConsumer({P0: [Record(7)]}, rebalances.during_fetch(None, {P0: [Record(8)]}))
    assert await poll_records(second_under_way, 100, 10, 5, assignment_epoch=rebalances) == {}
    assert second_under_way.seeks == []


async def test_a_rebalance_between_the_fetches_sends_the_new_assignment_back_to_its_first_records():
    """The first records are the old assignment's, the second the new one's: the step would mix them,
    so it is empty and the new assignment's records are fetched again (sought back, not dropped)."""
    rebalances = Rebalances()
    new = {P0: [Record(3), Record(4)], P1: [Record(20)]}
    consumer = ScriptedConsumer({P0: [Record(7)]}, rebalances.during_fetch(1, new))
    assert await poll_records(consumer, 100, 10, 5, assignment_epoch=rebalances) == {}
    assert consumer.seeks == [(P0, 3), (P1, 20)]


async def test_a_rebalance_that_ends_before_the_fetch_returns_leaves_its_records_a_step():
    """The records a getmany returns under the new assignment are that assignment's (aiokafka drops
    what it fetched for an old one): they are the step, whatever happened while it waited."""
    rebalances = Rebalances()
    consumer = ScriptedConsumer(rebalances.during_fetch(1, {P0: [Record(3)]}), {P0: [Record(4)]})
    batch = await poll_records(consumer, 100, 10, 5, assignment_epoch=rebalances)
    assert batch == {P0: [Record(3), Record(4)]}
    assert consumer.seeks == []
