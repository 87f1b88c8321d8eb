"""The local services are real: Kafka keeps per-key order through a consumer group, Redis stores data,
and `guardstream local up/down` leaves nothing running behind it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.local import kafka as kafka_service
from processor.local import services
from processor.local.redis import ping

pytestmark = pytest.mark.integration

PARTITIONS = 4
KEYS = 24
PER_KEY = 10


async def test_keyed_messages_reach_a_consumer_group(
    kafka_bootstrap: str, unique_topic: Callable[[str], str], topic_prefix: str
) -> None:
    topic = unique_topic("keyed")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()

    sent = {(f"session-{k}", i) for k in range(KEYS) for i in range(PER_KEY)}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(PER_KEY):  # interleave keys, as concurrent sessions would
            for k in range(KEYS):
                await producer.send(topic, key=f"session-{k}".encode(), value=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic_prefix}.group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list[tuple[str, int, int]] = []  # (key, value, partition)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while len(received) < len(sent) and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for partition, records in batches.items():
                received += [(r.key.decode(), int(r.value), partition.partition) for r in records]
        await consumer.commit()
    finally:
        await consumer.stop()

    assert {(key, value) for key, value, _ in received} == sent
    assert len(received) == len(sent)  # no duplicates either
    partitions_of: dict[str, set[int]] = defaultdict(set)
    values_of: dict[str, list[int]] = defaultdict(list)
    for key, value, partition in received:
        partitions_of[key].add(partition)
        values_of[key].append(value)
    assert all(len(parts) == 1 for parts in partitions_of.values()), partitions_of
    assert all(values == sorted(values) for values in values_of.values())  # per-key order kept
    assert len(set().union(*partitions_of.values())) > 1  # keys really spread over partitions


async def test_redis_reads_back_what_it_stored(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await client.set(f"{redis_prefix}plain", "value", ex=60)
        await client.hset(f"{redis_prefix}session", mapping={"tokens": "12", "verdict": "safe"})
        await client.rpush(f"{redis_prefix}log", "a", "b", "c")
        assert await client.get(f"{redis_prefix}plain") == "value"
        assert await client.hgetall(f"{redis_prefix}session") == {"tokens": "12", "verdict": "safe"}
        assert await client.lrange(f"{redis_prefix}log", 0, -1) == ["a", "b", "c"]
        assert 0 < await client.ttl(f"{redis_prefix}plain") <= 60
    finally:
        await client.delete(f"{redis_prefix}plain", f"{redis_prefix}session", f"{redis_prefix}log")
        await client.aclose()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "guardstream"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "processor.cli"]
    return subprocess.run(
        [*command, "local", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ.copy(),
    )


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """The pid no longer exists, or is only a zombie waiting for its new parent to reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] in "ZX":
            return True
        time.sleep(0.2)
    return False


def _recorded_pids(state: Path) -> list[int]:
    """Every process `up` recorded in the state folder (each node's, for a cluster)."""
    return [
        node["pid"]
        for info in services.status(state).values()
        for node in info.get("nodes", [info])
        if node["pid"] is not None
    ]


@pytest.mark.skipif(
    not shutil.which("redis-server") or not shutil.which("java"),
    reason="guardstream local needs redis-server and java on PATH",
)
def test_cli_up_down_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = _cli("up", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
    assert set(env) == {"KAFKA_BOOTSTRAP", "REDIS_URL"}
    assert f"KAFKA_BOOTSTRAP={env['KAFKA_BOOTSTRAP']}" in first.stdout
    assert kafka_service.broker_answers(env["KAFKA_BOOTSTRAP"])
    host_port = env["REDIS_URL"].removeprefix("redis://").split("/")[0]
    assert ping(host_port.split(":")[0], int(host_port.split(":")[1]))
    libs_marker = kafka_service.cache_root() / f"kafka-{kafka_service.KAFKA_VERSION}" / "libs" / ".complete"
    assert libs_marker.exists()
    fetched_at = libs_marker.stat().st_mtime_ns

    pids = _recorded_pids(state)
    assert len(pids) == 2
    assert all(info["running"] for info in services.status(state).values())

    again = _cli("up", "--state-dir", str(state))  # running already: reused, same addresses
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and again.stdout == first.stdout

    assert _cli("down", "--state-dir", str(state)).returncode == 0
    assert all(_gone(pid) for pid in pids), pids
    assert not (state / "env").exists()
    assert not any(info["running"] for info in services.status(state).values())

    restart = _cli("up", "--state-dir", str(state))  # stopped: starts again from the cached jars
    try:
        assert restart.returncode == 0, restart.stderr
        assert "Fetching" not in restart.stderr
        assert libs_marker.stat().st_mtime_ns == fetched_at
    finally:
        restart_pids = _recorded_pids(state)
        assert _cli("down", "--state-dir", str(state)).returncode == 0
    assert all(_gone(pid) for pid in restart_pids), restart_pids
