"""`guardstream local` runs a real Redis Cluster: three primaries with a replica each, keys spread over
them, a node killed comes back on its port as part of the same cluster, and `down` stops all six."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from processor.local import redis_cluster, services
from processor.local.process import ephemeral_ports

pytestmark = pytest.mark.integration


def test_a_cluster_of_three_primaries_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    entries, started = services.ensure(state, ["redis-cluster"])
    try:
        assert started
        client = RedisCluster.from_url(entries["redis-cluster"]["url"])
        try:
            info = redis_cluster.cluster_info(client.get_default_node().port)
            assert (info["cluster_size"], info["cluster_known_nodes"]) == ("3", "6")  # primaries, all
            for index in range(30):
                client.set(f"k{index}", index)
            assert len({client.get_node_from_key(f"k{index}").name for index in range(30)}) == 3
        finally:
            client.close()

        report = services.status(state)["redis-cluster"]
        assert report["running"] and len(report["nodes"]) == redis_cluster.NODES
        assert services.down(state, ["redis-cluster"]) == ["redis-cluster"]
        assert not services.status(state)["redis-cluster"]["running"]

        again, started = services.ensure(state, ["redis-cluster"])  # same ports: the cluster re-forms
        assert started and again["redis-cluster"]["url"] == entries["redis-cluster"]["url"]
        client = RedisCluster.from_url(again["redis-cluster"]["url"])
        try:
            assert [client.get(f"k{index}") for index in range(30)] == [str(i).encode() for i in range(30)]
        finally:
            client.close()
    finally:
        services.down(state)


def test_cli_up_redis_cluster_writes_its_env(tmp_path: Path) -> None:
    state = tmp_path / "state"
    command = [sys.executable, "-m", "processor.cli", "local"]
    up = subprocess.run([*command, "up", "--redis-cluster", "--state-dir", str(state)], capture_output=True)
    try:
        assert up.returncode == 0, up.stderr.decode()
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
        assert set(env) == {"KAFKA_BOOTSTRAP", "REDIS_URL", "REDIS_CLUSTER"} and env["REDIS_CLUSTER"] == "1"
        client = RedisCluster.from_url(env["REDIS_URL"])
        try:
            assert len(client.get_primaries()) == 3
        finally:
            client.close()
    finally:
        down = subprocess.run([*command, "down", "--state-dir", str(state)], capture_output=True)
    assert down.returncode == 0 and "redis-cluster" in down.stderr.decode()
    assert not any(info["running"] for info in services.status(state).values())


def test_node_ports_skip_a_bus_port_that_a_connection_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket bound without listening (an outgoing connection's local end) answers no connect, yet
    a node's bus could not bind its port: such a pair is skipped. Ports sit below the ephemeral range
    and none is handed out twice."""
    ports = [redis_cluster.free_node_port() for _ in range(redis_cluster.NODES)]
    assert len(set(ports)) == len(ports)
    if ephemeral_ports().start - redis_cluster.BUS_PORT_OFFSET > redis_cluster.MIN_NODE_PORT:
        assert all(port + redis_cluster.BUS_PORT_OFFSET < ephemeral_ports().start for port in ports)
    blocked, free = ports[:2]
    for port in (blocked, free):
        redis_cluster._handed_out -= {port, port + redis_cluster.BUS_PORT_OFFSET}
    picks = iter([blocked, free])
    monkeypatch.setattr(redis_cluster.random, "choice", lambda _: next(picks))
    with socket.socket() as held:
        held.bind(("127.0.0.1", blocked + redis_cluster.BUS_PORT_OFFSET))  # bound, not listening
        assert redis_cluster.free_node_port() == free
