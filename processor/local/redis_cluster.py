"""A local Redis Cluster: three primaries with a replica each, built by `redis-cli --cluster create`.

Each node is a `redis-server --cluster-enabled` with append-only persistence in a folder of its own
(`redis-cluster-1` ... `redis-cluster-6`). A node's `nodes.conf` records the cluster, so nodes started
again on the same ports re-form it by themselves; only a new cluster is created.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from processor.local import redis as redis_service
from processor.local.process import ServiceError, can_listen, ephemeral_ports, free_port

PRIMARIES = 3
REPLICAS_PER_PRIMARY = 1
NODES = PRIMARIES * (1 + REPLICAS_PER_PRIMARY)
# How long a primary may be unreachable before the cluster promotes its replica. Short, so that a
# local failover takes seconds; production clusters set their own.
NODE_TIMEOUT_MS = 2000
START_TIMEOUT_S = 30.0
BUS_PORT_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000
MIN_NODE_PORT = 10_000
# Ports given to nodes by this process: a node just spawned may not listen on them yet.
_handed_out: set[int] = set()


@dataclass(frozen=True)
class RedisClusterInstance:
    nodes: tuple[redis_service.RedisInstance, ...]

    @property
    def url(self) -> str:
        """Any node's address does: the client learns the others from it."""
        return self.nodes[0].url


def node_name(index: int) -> str:
    return f"redis-cluster-{index + 1}"


def redis_cli() -> str:
    """What builds the cluster and asks its nodes."""
    return redis_service.redis_binary("redis-cli", "redis-tools")


def preflight() -> None:
    redis_service.redis_server()
    redis_cli()


def free_node_port() -> int:
    """A port for a node whose bus port (+10000) is free too, both below the kernel's ephemeral range
    where it leaves room: nothing reserves the bus port until the node binds it, and in that range any
    outgoing connection may take it first."""
    below = range(MIN_NODE_PORT, ephemeral_ports().start - BUS_PORT_OFFSET)
    for _ in range(1000):
        port = random.choice(below) if below else free_port(redis_service.HOST)
        pair = {port, port + BUS_PORT_OFFSET}
        if port + BUS_PORT_OFFSET > 65535 or pair & _handed_out:
            continue
        if all(can_listen(redis_service.HOST, taken) for taken in pair):
            _handed_out.update(pair)
            return port
    raise ServiceError("found no free port pair (port, port + 10000) for a Redis Cluster node")


def start_node(state_dir: Path, index: int, port: int | None = None) -> redis_service.RedisInstance:
    port = port or free_node_port()
    cluster_args = (
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
    )  # fmt: skip
    return redis_service.start(state_dir, port, name=node_name(index), extra_args=cluster_args)


def _ask(port: int, *command: str) -> dict[str, str]:
    """A node's `key:value` lines answer (CLUSTER INFO, INFO) as a dict; empty when it does not answer."""
    try:
        answer = subprocess.run(
            [redis_cli(), "-h", redis_service.HOST, "-p", str(port), *command],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.strip().split(":", 1) for line in answer.splitlines() if ":" in line)


def cluster_info(port: int) -> dict[str, str]:
    return _ask(port, "cluster", "info")


def _serving(port: int) -> bool:
    """The node sees every slot served, and, a replica, holds its primary's data (a replica still in
    its first sync could neither acknowledge a WAIT nor take over)."""
    if cluster_info(port).get("cluster_state") != "ok":
        return False
    replication = _ask(port, "info", "replication")
    return replication.get("role") == "master" or replication.get("master_link_status") == "up"


def wait_ready(cluster: RedisClusterInstance, state_dir: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Every node answers; a new cluster is created; then every node serves (`_serving`)."""
    for node in cluster.nodes:
        redis_service.wait_ready(node, state_dir, timeout)
    if cluster_info(cluster.nodes[0].port).get("cluster_slots_assigned") == "0":
        _create(cluster)
    deadline = time.monotonic() + timeout
    while True:
        waiting = [node.port for node in cluster.nodes if not _serving(node.port)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the local Redis Cluster's nodes on {waiting} did not come up in {timeout:.0f}s"
            )
        time.sleep(0.2)


def _create(cluster: RedisClusterInstance) -> None:
    addresses = [f"{redis_service.HOST}:{node.port}" for node in cluster.nodes]
    command = [redis_cli(), "--cluster", "create", *addresses]
    command += ["--cluster-replicas", str(REPLICAS_PER_PRIMARY), "--cluster-yes"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServiceError(f"redis-cli --cluster create failed:\n{result.stdout[-2000:]}{result.stderr}")
