"""A Redis Cluster primary killed under load: its replica is promoted and the worker carries on.

Redis replicates asynchronously, so a promoted replica can lack writes its primary acknowledged. The
"lagging" faults make that happen (the replica is cut off while its primary takes writes, then the
primary is killed) and show what `--redis-wait-replicas 1` changes: without it the worker committed
steps whose session writes the cluster then lost (those tokens are missing from the conversations'
histories); with it, no step is committed before a replica holds its writes.

    GUARDSTREAM_RECORD_RESULTS=1 .venv/bin/pytest -q -s tests/reliability/test_redis_cluster.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as BlockingRedisCluster

from processor.local import services

from .load import SteadyLoad, VerdictRecorder, finish_and_check, steady_load
from .workers import WorkerConfig

pytestmark = [pytest.mark.integration]

PARTITIONS = 6
FAILOVER_TIMEOUT_S = 30.0


@dataclass
class OwnCluster:
    state_dir: Path
    url: str

    async def primary_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot now."""
        client = RedisCluster.from_url(self.url)
        try:
            await client.initialize()
            return int(client.get_node_from_key(key).port)
        finally:
            await client.aclose()

    async def replica_of(self, primary_port: int) -> int:
        info = await _node_info(primary_port, "replication")
        return int(info["slave0"].split("port=")[1].split(",")[0])

    async def pid(self, port: int) -> int:
        return int((await _node_info(port, "server"))["process_id"])

    async def cut_replication(self, primary_port: int) -> None:
        """The primary drops its replica's link: what it writes from now on reaches no replica until the
        replica connects again (a network partition, in effect)."""
        await _redis_cli(primary_port, "client", "kill", "type", "replica")

    def restart_stopped_nodes(self) -> None:
        """Nodes come back on their ports with their data; a killed primary rejoins as a replica."""
        services.ensure(self.state_dir, ["redis-cluster"])


async def _redis_cli(port: int, *command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "redis-cli", "-p", str(port), *command, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    return out.decode()


async def _node_info(port: int, section: str) -> dict[str, str]:
    lines = (await _redis_cli(port, "info", section)).splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    """A Redis Cluster of this test's own: the shared one must not lose a primary."""
    state_dir = tmp_path / "own-redis-cluster"
    entries, _ = services.ensure(state_dir, ["redis-cluster"])
    try:
        yield OwnCluster(state_dir, entries["redis-cluster"]["url"])
    finally:
        services.down(state_dir, ["redis-cluster"])


def cluster_worker(worker_config, pool, kafka_bootstrap: str, cluster: OwnCluster, wait_replicas: int):
    environment = {"REDIS_CLUSTER": "true", "REDIS_WAIT_REPLICAS": str(wait_replicas)}
    config = worker_config(kafka_bootstrap, cluster.url, partitions=PARTITIONS, environment=environment)
    (worker,) = pool(config).start("worker")
    return config, worker


def session_key(config: WorkerConfig, conversation_id: str) -> str:
    return f"{config.redis_prefix}session:{{{conversation_id}}}"


def tokens_missing_from_histories(model, config: WorkerConfig, load: SteadyLoad) -> int:
    """Tokens each conversation's model input should hold, less what its Redis session says it holds."""
    client = BlockingRedisCluster.from_url(config.redis_url)
    try:
        stored = [
            int(
                client.hget(f"{config.redis_prefix}session:{{{conversation.conversation_id}}}", "length") or 0
            )
            for conversation in load.conversations
        ]
    finally:
        client.close()
    expected = [len(conversation.rendered(model)) for conversation in load.conversations]
    return sum(want - have for want, have in zip(expected, stored, strict=True))


async def wait_promoted(cluster: OwnCluster, key: str, old_primary: int) -> float:
    """Until another node serves `key`'s slot; returns when that was seen."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the cluster is reconfiguring
            if await cluster.primary_of(key) != old_primary:
                return time.time()
        await asyncio.sleep(0.2)
    raise AssertionError(f"no replica took over from the primary on port {old_primary}")


FAULTS = {
    # name: (the replica cut off before the kill, --redis-wait-replicas)
    "in_sync": (False, 0),
    "lagging": (True, 0),
    "lagging_wait1": (True, 1),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
async def test_sigkill_a_primary_under_load(model, worker_config, pool, kafka_bootstrap, own_cluster, fault):
    """A primary is SIGKILLed and its replica promoted; the worker retries the writes to its slots
    meanwhile, then goes on. In sync, nothing is lost. Lagging: the replica's link is cut and the
    replica paused for 3 s while its primary takes the worker's writes, then the primary is killed and
    the stale replica promoted. Without WAIT the worker had committed those steps: their tokens are
    missing from the histories (the next events report a seq gap). With WAIT 1 none was committed,
    and the worker's retried writes land on the promoted replica."""
    lagging, wait_replicas = FAULTS[fault]
    config, worker = cluster_worker(worker_config, pool, kafka_bootstrap, own_cluster, wait_replicas)
    await worker.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=11)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        key = session_key(config, load.conversations[0].conversation_id)
        primary = await own_cluster.primary_of(key)
        primary_pid = await own_cluster.pid(primary)
        if lagging:
            replica_pid = await own_cluster.pid(await own_cluster.replica_of(primary))
            os.kill(replica_pid, signal.SIGSTOP)  # it cannot connect again until SIGCONT
            try:
                await own_cluster.cut_replication(primary)
                await asyncio.sleep(3)
                killed_at = time.time()
                os.kill(primary_pid, signal.SIGKILL)
            finally:
                os.kill(replica_pid, signal.SIGCONT)
        else:
            killed_at = time.time()
            os.kill(primary_pid, signal.SIGKILL)
        promoted_at = await wait_promoted(own_cluster, key, primary)
        await asyncio.sleep(5)
        await asyncio.to_thread(own_cluster.restart_stopped_nodes)
        delivery = await finish_and_check(
            f"Redis Cluster primary SIGKILL, {fault.replace('_', ' ')}",
            model,
            load,
            streaming,
            recorder,
            killed_at,
            lossless=not lagging or bool(wait_replicas),
            what="replica promoted; the killed primary restarted 5 s later as a replica",
            failover_s=round(promoted_at - killed_at, 2),
            step_failures=lambda: worker.metric("guardstream_step_failures_total"),
            session_conflicts=lambda: worker.metric("guardstream_session_conflicts_total"),
            tokens_missing_from_histories=lambda: tokens_missing_from_histories(model, config, load),
        )
    assert worker.alive()
    missing = tokens_missing_from_histories(model, config, load)
    if lagging and not wait_replicas:
        assert missing > 0 and delivery.problems, "the promoted replica lacked no write: no fault to show"
    else:
        assert missing == 0
