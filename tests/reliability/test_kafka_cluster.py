"""Faults in a three-broker Kafka cluster under load, with a real worker process.

The worker creates its topics itself, so they follow the cluster: three copies, two in sync. The load's
producer and the worker's both write with acks=all (processor.client.GuardProducer, worker/serve.py),
so an acknowledged record is on two brokers and survives one of them dying. Each test kills or restarts
one node mid-stream and then checks (load.check_delivery) that every token event has its verdict with
the labels of `score_ids` on the whole conversation; duplicated verdicts and the recovery are recorded
in bench/results/reliability.json.

    .venv/bin/pytest -q tests/reliability/test_kafka_cluster.py -s     # -s prints each fault's figures
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.local import services

from .brokers import KafkaCluster
from .load import VerdictRecorder, finish_and_check, recovery_seconds, steady_load
from .workers import WorkerConfig, WorkerProcess

pytestmark = [pytest.mark.integration]

BROKERS = 3
PARTITIONS = 6
# Past the controller's broker session timeout (9 s), after which a killed broker's partitions have
# new leaders, with time to spare for the streams to catch up.
AFTER_KILL_S = 20


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    """Three nodes of this test's own: killing one of the shared broker's would disturb other tests."""
    state_dir = tmp_path / "own-kafka-cluster"
    entries, _ = services.ensure(state_dir, ["kafka"], brokers=BROKERS)
    try:
        yield KafkaCluster(state_dir, entries["kafka"]["bootstrap"])
    finally:
        services.down(state_dir, ["kafka"])


async def start_worker(cluster: KafkaCluster, config: WorkerConfig, pool) -> WorkerProcess:
    """One worker owning every partition, its topics created at the cluster's replication."""
    (worker,) = pool(config).start("worker")
    await worker.wait_assigned()
    for topic in (config.tokens_topic, config.verdicts_topic):
        replicas = await cluster.replicas(topic)
        assert {len(nodes) for nodes in replicas.replicas.values()} == {BROKERS}, replicas
        assert replicas.min_insync_replicas == 2, replicas
    return worker


async def leader_to_kill(cluster: KafkaCluster, topic: str) -> tuple[int, list[int]]:
    """A node leading partitions of `topic` that is not the active controller (that fault is another
    test's); returns it and the partitions it leads."""
    leaders = (await cluster.replicas(topic)).leaders
    controller = cluster.active_controller()
    node = next((node for node in leaders.values() if node != controller), leaders[0])
    return node, sorted(partition for partition, leader in leaders.items() if leader == node)


@pytest.mark.timeout(240)
async def test_partition_leader_sigkill(model, worker_config, pool, redis_url, kafka_cluster):
    """The leader of partitions the worker consumes dies: once the controller fences it, the other
    replicas lead, the producers' retries land there, and the worker resumes."""
    config = worker_config(kafka_cluster.bootstrap, redis_url, partitions=PARTITIONS)
    worker = await start_worker(kafka_cluster, config, pool)
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=11)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        victim, led = await leader_to_kill(kafka_cluster, config.tokens_topic)
        coordinator = await kafka_cluster.coordinator(config.group_id)
        killed_at = time.time()
        await asyncio.to_thread(kafka_cluster.kill, victim)
        await asyncio.sleep(AFTER_KILL_S)
        assert worker.alive(), worker.tail()
        leaders_after = (await kafka_cluster.replicas(config.tokens_topic)).leaders
        await finish_and_check(
            "Kafka partition leader SIGKILL (1 of 3 brokers)",
            model,
            load,
            streaming,
            recorder,
            killed_at,
            what="the leader of partitions the worker consumes killed, not restarted; RF 3, min ISR 2",
            led_partitions=len(led),
            was_group_coordinator=coordinator == victim,
            step_failures=lambda: worker.metric("guardstream_step_failures_total"),
        )
    assert victim not in leaders_after.values(), leaders_after


@pytest.mark.timeout(240)
async def test_active_controller_sigkill(model, worker_config, pool, redis_url, kafka_cluster):
    """The active controller (a broker too) dies: the other two controllers elect a leader among
    themselves, which then fences the dead broker and moves its leaderships."""
    config = worker_config(kafka_cluster.bootstrap, redis_url, partitions=PARTITIONS)
    worker = await start_worker(kafka_cluster, config, pool)
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=12)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        controller = kafka_cluster.active_controller()
        led = (await kafka_cluster.replicas(config.tokens_topic)).leaders
        killed_at = time.time()
        await asyncio.to_thread(kafka_cluster.kill, controller)
        successor = await asyncio.to_thread(kafka_cluster.active_controller, controller)
        elected_s = time.time() - killed_at
        await asyncio.sleep(AFTER_KILL_S)
        assert worker.alive(), worker.tail()
        await finish_and_check(
            "Kafka active controller SIGKILL (1 of 3 nodes)",
            model,
            load,
            streaming,
            recorder,
            killed_at,
            what="the quorum's leader (a broker too) killed, not restarted; a new one elected",
            controller_elected_s=round(elected_s, 2),
            led_partitions=sum(leader == controller for leader in led.values()),
            step_failures=lambda: worker.metric("guardstream_step_failures_total"),
        )
    assert successor != controller


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["terminated", "killed"])
async def test_broker_restarted_with_its_data(model, worker_config, pool, redis_url, kafka_cluster, stop):
    """A broker leading partitions stops (SIGTERM: controlled shutdown; SIGKILL: a crash), stays down
    3 s, and starts again on its ports with its data: it catches up and every replica is in sync."""
    config = worker_config(kafka_cluster.bootstrap, redis_url, partitions=PARTITIONS)
    worker = await start_worker(kafka_cluster, config, pool)
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=13 if stop == "terminated" else 14)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        victim, led = await leader_to_kill(kafka_cluster, config.tokens_topic)
        stopped_at = time.time()
        halt = kafka_cluster.terminate if stop == "terminated" else kafka_cluster.kill
        await asyncio.to_thread(halt, victim)
        await asyncio.sleep(3)
        await asyncio.to_thread(kafka_cluster.start)
        resumed_at = time.time()
        in_sync_s = await kafka_cluster.wait_in_sync([config.tokens_topic, config.verdicts_topic])
        await asyncio.sleep(6)
        assert worker.alive(), worker.tail()
        await finish_and_check(
            f"Kafka broker {stop} and restarted (1 of 3)",
            model,
            load,
            streaming,
            recorder,
            stopped_at,  # the cluster serves on without the node: recovery counts from the fault
            what=f"a partition leader {'SIGTERM' if stop == 'terminated' else 'SIGKILL'}, down 3 s, "
            "started on its ports and data; its replicas caught up",
            outage_s=round(resumed_at - stopped_at, 2),
            in_sync_after_s=round(in_sync_s, 2),
            recovery_after_restart_s=lambda: recovery_seconds(recorder, load, resumed_at),
            led_partitions=len(led),
            step_failures=lambda: worker.metric("guardstream_step_failures_total"),
        )
