"""Real Kafka / Redis endpoints for test sessions, from the cheapest source available.

Order, per service: an address given in the environment (GUARDSTREAM_TEST_KAFKA / GUARDSTREAM_TEST_REDIS /
GUARDSTREAM_TEST_REDIS_CLUSTER), else a testcontainers container when a Docker engine answers (not for the
Redis Cluster), else local processes started through `processor.local.services` in a throw-away state
folder. Everything started here is stopped when the caller's ExitStack closes.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from processor.local import kafka as kafka_service
from processor.local import services

KAFKA_ENV = "GUARDSTREAM_TEST_KAFKA"
REDIS_ENV = "GUARDSTREAM_TEST_REDIS"
REDIS_CLUSTER_ENV = "GUARDSTREAM_TEST_REDIS_CLUSTER"  # a node's redis:// URL
NO_DOCKER_ENV = "GUARDSTREAM_TEST_NO_DOCKER"  # set to 1 to force local processes even with Docker
KAFKA_IMAGE = f"apache/kafka:{kafka_service.KAFKA_VERSION}"
REDIS_IMAGE = "redis:7"

_docker_answer: bool | None = None


def docker_available() -> bool:
    """Does a Docker engine answer right now? Asked once per process, with a short timeout."""
    global _docker_answer
    if _docker_answer is None:
        _docker_answer = False
        if not os.environ.get(NO_DOCKER_ENV):
            try:
                import docker

                client = docker.from_env(timeout=3)
                try:
                    _docker_answer = bool(client.ping())
                finally:
                    client.close()
            except Exception:  # no client library, no socket, no permission: all mean "no Docker"
                _docker_answer = False
    return _docker_answer


def kafka_endpoint(stack: contextlib.ExitStack, state_dir: Path) -> str:
    if address := os.environ.get(KAFKA_ENV):
        return address
    if docker_available():
        return _kafka_container(stack)
    return _local(stack, state_dir, "kafka")


def redis_endpoint(stack: contextlib.ExitStack, state_dir: Path) -> str:
    if address := os.environ.get(REDIS_ENV):
        return address if "://" in address else f"redis://{address}/0"
    if docker_available():
        return _redis_container(stack)
    return _local(stack, state_dir, "redis")


def redis_cluster_endpoint(stack: contextlib.ExitStack, state_dir: Path) -> str:
    return os.environ.get(REDIS_CLUSTER_ENV) or _local(stack, state_dir, "redis-cluster")


def _local(stack: contextlib.ExitStack, state_dir: Path, name: str) -> str:
    entries, _ = services.ensure(state_dir, [name])
    stack.callback(services.down, state_dir, [name])
    entry = entries[name]
    return str(entry["bootstrap"] if name == "kafka" else entry["url"])


def _kafka_container(stack: contextlib.ExitStack) -> str:
    # apache/kafka must advertise the host-mapped port, known only once the container runs: the
    # container waits for a start script that we copy in after `start()` (the testcontainers-java way).
    from testcontainers.core.container import DockerContainer

    script = "/tmp/guardstream-start.sh"
    container: Any = DockerContainer(KAFKA_IMAGE).with_exposed_ports(9092)
    for key, value in {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,BROKER://0.0.0.0:9093,CONTROLLER://0.0.0.0:9094",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9094",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }.items():
        container = container.with_env(key, value)
    container = container.with_command(f'sh -c "while [ ! -f {script} ]; do sleep 0.1; done; sh {script}"')
    container.start()
    stack.callback(container.stop)
    host, port = container.get_container_host_ip(), container.get_exposed_port(9092)
    body = (
        f"export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://{host}:{port},BROKER://localhost:9093\n"
        "exec /etc/kafka/docker/run\n"
    ).encode()
    archive = BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo(script.lstrip("/"))
        info.size, info.mtime, info.mode = len(body), int(time.time()), 0o755
        tar.addfile(info, BytesIO(body))
    container.get_wrapped_container().put_archive("/", archive.getvalue())
    bootstrap = f"{host}:{port}"
    deadline = time.monotonic() + kafka_service.START_TIMEOUT_S
    while not kafka_service.broker_answers(bootstrap):
        if time.monotonic() > deadline:
            logs = container.get_wrapped_container().logs(tail=40).decode(errors="replace")
            raise services.ServiceError(f"Kafka container did not answer on {bootstrap}:\n{logs}")
        time.sleep(0.5)
    return bootstrap


def _redis_container(stack: contextlib.ExitStack) -> str:
    from testcontainers.core.container import DockerContainer

    container: Any = (
        DockerContainer(REDIS_IMAGE).with_exposed_ports(6379).with_command("redis-server --appendonly yes")
    )
    container.start()
    stack.callback(container.stop)
    host, port = container.get_container_host_ip(), int(container.get_exposed_port(6379))
    deadline = time.monotonic() + 30
    from processor.local.redis import ping

    while not ping(host, port):
        if time.monotonic() > deadline:
            raise services.ServiceError(f"Redis container did not answer PING on {host}:{port}")
        time.sleep(0.2)
    return f"redis://{host}:{port}/0"


def unique_name(prefix: str, test_name: str) -> str:
    """A Kafka-legal, per-test unique name: `<prefix>.<test>.<nanos>`."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", test_name)[:80]
    return f"{prefix}.{safe}.{time.time_ns():x}"
