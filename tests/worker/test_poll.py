"""A step's poll: the consumer's held records, then those of the fetch the drain sets off (pure logic,
a scripted consumer; the pipeline benchmark measures what it does to latency against a real broker)."""

from __future__ import annotations

from aiokafka import TopicPartition

from processor.worker.worker import poll_records

from .fakes import ScriptedConsumer

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


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
