"""`up(..., brokers=3)` runs a real three-node Kafka cluster: topics get three copies with two in sync,
acks=all writes reach a consumer, and `down` stops every node."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from processor.local import kafka as kafka_service
from processor.local import services

from .test_services import _gone

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which("redis-server") or not shutil.which("java"),
        reason="guardstream local needs redis-server and java on PATH",
    ),
]

BROKERS = 3
RECORDS = 200


async def _create_replicated_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 3, replication_factor=3, topic_configs={"min.insync.replicas": "2"})]
        )
    finally:
        await admin.close()


async def _replication(bootstrap: str, topic: str) -> tuple[set[int], list[int], str]:
    """(replica counts of the topic's partitions, their in-sync counts, its min.insync.replicas)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    entries = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
    partitions = described["partitions"]
    return (
        {len(partition["replicas"]) for partition in partitions},
        [len(partition["isr"]) for partition in partitions],
        entries["min.insync.replicas"],
    )


async def _produce_and_consume(bootstrap: str, topic: str) -> list[bytes]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for index in range(RECORDS):
            await producer.send(topic, key=f"k{index % 7}".encode(), value=str(index).encode())
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{topic}.group", auto_offset_reset="earliest"
    )
    await consumer.start()
    received: list[bytes] = []
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while len(received) < RECORDS and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                received += [record.value for record in records]
    finally:
        await consumer.stop()
    return received


@pytest.mark.timeout(300)
async def test_three_brokers_replicate_and_all_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = await asyncio.to_thread(services.up, state, brokers=BROKERS)
    try:
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
        nodes = services.status(state)["kafka"]["nodes"]
        assert env["KAFKA_BOOTSTRAP"] == up.kafka_bootstrap == ",".join(node["address"] for node in nodes)
        assert [node["node_id"] for node in nodes] == [1, 2, 3] and all(node["running"] for node in nodes)
        assert kafka_service.active_controller(state, [1, 2, 3]) in (1, 2, 3)

        topic = "replicated"
        await _create_replicated_topic(up.kafka_bootstrap, topic)
        received = await _produce_and_consume(up.kafka_bootstrap, topic)
        assert sorted(int(value) for value in received) == list(range(RECORDS))
        replicas, in_sync, min_isr = await _replication(up.kafka_bootstrap, topic)
        assert replicas == {3} and in_sync == [3, 3, 3] and min_isr == "2"
        # The cluster's own default for topics created without settings (here the group's offsets).
        replicas, _, min_isr = await _replication(up.kafka_bootstrap, "__consumer_offsets")
        assert replicas == {3} and min_isr == "2"
    finally:
        pids = [node["pid"] for node in services.status(state)["kafka"]["nodes"] if node["pid"]]
        stopped = await asyncio.to_thread(services.down, state)
    assert "kafka" in stopped and len(pids) == BROKERS
    assert all(_gone(pid) for pid in pids), pids
    assert not any(node["running"] for node in services.status(state)["kafka"]["nodes"])


@pytest.mark.timeout(300)
async def test_a_killed_node_comes_back_on_its_ports_with_its_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    entries, _ = await asyncio.to_thread(services.ensure, state, ["kafka"], None, BROKERS)
    try:
        bootstrap = entries["kafka"]["bootstrap"]
        await _create_replicated_topic(bootstrap, "kept")
        victim = services.status(state)["kafka"]["nodes"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        assert _gone(victim["pid"])
        assert not services.status(state)["kafka"]["running"]

        # A plain ensure (no broker count) restarts only the dead node, as recorded.
        again, started = await asyncio.to_thread(services.ensure, state, ["kafka"])
        assert started and again["kafka"]["bootstrap"] == bootstrap
        nodes = services.status(state)["kafka"]["nodes"]
        assert nodes[1]["address"] == victim["address"] and nodes[1]["pid"] != victim["pid"]
        assert all(node["running"] for node in nodes)
        assert "kept" in await _topics(bootstrap)
        with pytest.raises(services.ServiceError, match="already runs 3 broker"):
            services.ensure(state, ["kafka"], None, 1)
    finally:
        await asyncio.to_thread(services.down, state)
    with pytest.raises(services.ServiceError, match="belongs to 3 broker"):
        services.ensure(state, ["kafka"], None, 1)


async def _topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()
