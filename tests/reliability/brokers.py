"""A Kafka cluster of a test's own (processor.local, three nodes): kill, stop and restart a node, and
ask which node leads a partition, coordinates a group, or is the active controller.

Every node is a broker and a controller (KRaft), so killing the active controller kills a broker too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from processor.local import kafka as kafka_service
from processor.local import services


@dataclass(frozen=True)
class TopicReplicas:
    """What the cluster reports for a topic: per partition its leader, replicas and in-sync replicas."""

    leaders: dict[int, int]
    replicas: dict[int, list[int]]
    in_sync: dict[int, list[int]]
    min_insync_replicas: int


@dataclass
class KafkaCluster:
    state_dir: Path
    bootstrap: str

    def node_ids(self) -> list[int]:
        return [node["node_id"] for node in self._nodes()]

    def running(self, node_id: int) -> bool:
        return bool(self._node(node_id)["running"])

    def kill(self, node_id: int) -> None:
        """SIGKILL: no controlled shutdown; the controller fences it after the broker session timeout."""
        self._signal(node_id, signal.SIGKILL, timeout=10)

    def terminate(self, node_id: int) -> None:
        """SIGTERM: a controlled shutdown moves its leaderships to the other replicas before it exits."""
        self._signal(node_id, signal.SIGTERM, timeout=60)

    def start(self) -> None:
        """Start the nodes that are down, on their own ports with their data; returns once they serve."""
        entries, _ = services.ensure(self.state_dir, ["kafka"])
        assert entries["kafka"]["bootstrap"] == self.bootstrap, "a node came back on other ports"

    def active_controller(self, other_than: int | None = None, timeout: float = 30.0) -> int:
        """The quorum's leader, once there is one (and it is not `other_than`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = kafka_service.active_controller(self.state_dir, self.node_ids())
            if leader is not None and leader != other_than and self.running(leader):
                return leader
            time.sleep(0.1)
        raise TimeoutError(f"no active controller (other than {other_than}) after {timeout:.0f}s")

    async def replicas(self, topic: str) -> TopicReplicas:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
            (configs,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        finally:
            await admin.close()
        partitions = {partition["partition"]: partition for partition in described["partitions"]}
        entries = {entry[0]: entry[1] for entry in configs.resources[0][4]}
        return TopicReplicas(
            leaders={index: partition["leader"] for index, partition in partitions.items()},
            replicas={index: partition["replicas"] for index, partition in partitions.items()},
            in_sync={index: partition["isr"] for index, partition in partitions.items()},
            min_insync_replicas=int(entries["min.insync.replicas"]),
        )

    async def coordinator(self, group_id: str) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            return await admin.find_coordinator(group_id)
        finally:
            await admin.close()

    async def wait_in_sync(self, topics: list[str], timeout: float = 60.0) -> float:
        """Until every replica of every partition of `topics` is in sync again; returns the seconds."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            described = [await self.replicas(topic) for topic in topics]
            if all(
                sorted(topic.in_sync[index]) == sorted(replicas)
                for topic in described
                for index, replicas in topic.replicas.items()
            ):
                return time.monotonic() - started
            await asyncio.sleep(0.5)
        raise TimeoutError(f"replicas of {topics} not all in sync after {timeout:.0f}s")

    def _nodes(self) -> list[dict]:
        return list(services.status(self.state_dir)["kafka"]["nodes"])

    def _node(self, node_id: int) -> dict:
        return next(node for node in self._nodes() if node["node_id"] == node_id)

    def _signal(self, node_id: int, signum: signal.Signals, timeout: float) -> None:
        os.kill(self._node(node_id)["pid"], signum)
        deadline = time.monotonic() + timeout
        while self.running(node_id):  # `running` also reaps it: the test process started it
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka node {node_id} still runs {timeout:.0f}s after {signum.name}")
            time.sleep(0.1)
