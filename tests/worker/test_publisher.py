"""BatchPublisher against the real broker: same partitions as `send`, order kept, nothing lost."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from processor.worker.publisher import BatchPublisher

pytestmark = pytest.mark.integration


async def create_topic(kafka_bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def read_all(kafka_bootstrap: str, topic: str, count: int) -> list:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    records = []
    try:
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, f"{topic}: {len(records)} of {count} records arrived"
            records += [record for partition_records in batch.values() for record in partition_records]
    finally:
        await consumer.stop()
    return records


async def test_batches_land_where_send_puts_them_in_order(kafka_bootstrap, unique_topic):
    batched, single = unique_topic("batched"), unique_topic("single")
    for topic in (batched, single):
        await create_topic(kafka_bootstrap, topic, 5)
    keys = [f"conversation-{index % 37}".encode() for index in range(3000)]
    # 3000 records of ~100 bytes pass the producer's 16 KiB batch size many times over per partition.
    records = [(key, b"%s:%06d:" % (key, index) + b"x" * 60) for index, key in enumerate(keys)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await BatchPublisher(producer).publish(batched, records)
        for key, value in records[:200]:
            await producer.send(single, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    received = await read_all(kafka_bootstrap, batched, len(records))
    assert sorted(record.value for record in received) == sorted(value for _, value in records)
    partition_of_key = {}
    for record in received:
        assert partition_of_key.setdefault(record.key, record.partition) == record.partition
    for partition in {record.partition for record in received}:
        values = [record.value for record in received if record.partition == partition]
        assert values == sorted(values, key=lambda value: int(value.split(b":")[1]))  # send order

    by_send = {record.key: record.partition for record in await read_all(kafka_bootstrap, single, 200)}
    assert by_send == {key: partition_of_key[key] for key in by_send}


async def test_a_record_larger_than_a_batch_goes_alone(kafka_bootstrap, unique_topic):
    topic = unique_topic("large")
    await create_topic(kafka_bootstrap, topic, 1)
    large = b"y" * 100_000  # over the producer's max_batch_size below
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_batch_size=16_384)
    await producer.start()
    try:
        await BatchPublisher(producer).publish(topic, [(b"k", b"small"), (b"k", large), (b"k", b"after")])
    finally:
        await producer.stop()
    assert [record.value for record in await read_all(kafka_bootstrap, topic, 3)] == [
        b"small",
        large,
        b"after",
    ]


async def test_remembered_partitions_are_per_topic(kafka_bootstrap, unique_topic):
    """One publisher, the same keys, topics of 5 and 3 partitions: each record lands where aiokafka's
    partitioner (what `send` uses, checked above) puts it for that topic."""
    five, three = unique_topic("five"), unique_topic("three")
    await create_topic(kafka_bootstrap, five, 5)
    await create_topic(kafka_bootstrap, three, 3)
    keys = [f"3f2b8c1e-7d4a-4c3b-9a8e-{index:012d}".encode() for index in range(40)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        publisher = BatchPublisher(producer)
        for topic in (five, three, five):
            await publisher.publish(topic, [(key, topic.encode()) for key in keys])
    finally:
        await producer.stop()

    partitioner = DefaultPartitioner()
    for topic, count in ((five, 5), (three, 3)):
        received = await read_all(kafka_bootstrap, topic, len(keys) * (2 if topic == five else 1))
        expected = {key: partitioner(key, list(range(count)), list(range(count))) for key in keys}
        assert {(record.key, record.partition) for record in received} == set(expected.items())
