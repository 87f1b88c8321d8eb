"""Apache Kafka on this machine (KRaft), run straight from Maven Central jars: one node or a cluster of
several, each node a broker and a controller in one JVM, the controllers forming one quorum.

Why jars from Maven and not a tarball: Maven Central is reachable wherever PyPI is, and `mvn` resolves
the broker's whole runtime classpath for us. The jars are fetched once into the user cache and reused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from processor.local.process import (
    EndedDuringStartup,
    ManagedProcess,
    ServiceError,
    describe_exit,
    is_running,
    port_in_use,
    spawn,
    tail,
)
from processor.worker.topics import replication_for

KAFKA_VERSION = os.environ.get("GUARDSTREAM_KAFKA_VERSION", "4.4.0")
# Kafka 4 logs through slf4j 1.7 -> log4j2; it ships log4j-core but no slf4j binding, so we add one.
LOG4J_VERSION = "2.25.5"
HOST = "127.0.0.1"
JVM_HEAP = ("-Xms256m", "-Xmx512m")
# The serial collector: a local broker shares a small machine with the worker, and G1's concurrent
# marking and GC threads would take a large share of the broker's CPU (docs/benchmarks.md).
JVM_GC = "-XX:+UseSerialGC"
MIN_JAVA = 17
START_TIMEOUT_S = 90.0

_T = TypeVar("_T")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>guardstream.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="server" fileName={log} filePattern={pattern}>
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class KafkaNode:
    """One node of a local cluster: its id (1, 2, ...) and the ports of its two listeners."""

    node_id: int
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def voter(self) -> str:
        return f"{self.node_id}@{HOST}:{self.controller_port}"


@dataclass(frozen=True)
class KafkaInstance:
    process: ManagedProcess
    node: KafkaNode

    @property
    def bootstrap(self) -> str:
        return self.node.bootstrap


def bootstrap_servers(nodes: Sequence[KafkaNode]) -> str:
    """Every node's address: a client that knows them all still starts when one is down."""
    return ",".join(node.bootstrap for node in nodes)


def node_home(state_dir: Path, node_id: int) -> Path:
    """A node's config, data and logs: `kafka/` for node 1 (a single node's folder), `kafka-<id>/` else."""
    return state_dir / ("kafka" if node_id == 1 else f"kafka-{node_id}")


def cache_root() -> Path:
    if env := os.environ.get("GUARDSTREAM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guardstream"


def java_command() -> str:
    """The `java` to run, checked to be new enough for Kafka 4 (Java 17+)."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise ServiceError(
            "Java 17+ is required to run the local Kafka broker but `java` was not found.\n"
            "Install it, e.g.: apt-get install default-jre-headless maven (Java 17+)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1)) if match.group(1) != "1" else int(match.group(2) or 0)
        if major < MIN_JAVA:
            raise ServiceError(
                f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, but {java} is Java {major}.\n"
                "Install e.g.: apt-get install default-jre-headless, or set JAVA_HOME."
            )
    return java


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _libs_dir(version: str) -> Path:
    return cache_root() / f"kafka-{version}" / "libs"


def preflight(version: str = KAFKA_VERSION) -> None:
    """Fail early, before anything starts, if Java (or Maven for a first download) is missing."""
    java_command()
    if not (_libs_dir(version) / ".complete").exists() and not shutil.which("mvn"):
        raise ServiceError(
            f"Kafka {version} is not cached in {_libs_dir(version).parent} and Maven (`mvn`) is needed to "
            "fetch it once.\nInstall it, e.g.: apt-get install maven default-jre-headless"
        )


def ensure_distribution(version: str = KAFKA_VERSION) -> Path:
    """Folder of the broker's jars, fetched with Maven on first use only."""
    libs = _libs_dir(version)
    home = libs.parent
    done = libs / ".complete"
    if done.exists():
        return libs
    # A lock, so two test sessions starting at once download once and never see half a folder.
    with _file_lock(cache_root() / f".kafka-{version}.lock"):
        if done.exists():
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise ServiceError(
                f"Kafka {version} is not cached in {home} and Maven (`mvn`) is needed to fetch it once.\n"
                "Install it, e.g.: apt-get install maven default-jre-headless"
            )
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        print(
            f"Fetching Apache Kafka {version} from Maven Central into {home} (first run only)...",
            file=sys.stderr,
            flush=True,
        )
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not any(staging.glob(f"kafka_2.13-{version}.jar")):
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise ServiceError(f"Maven could not fetch org.apache.kafka:kafka_2.13:{version}:\n{output}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        done.write_text(version + "\n")
    return libs


def _new_cluster_id() -> str:
    # Kafka's own format: 16 random bytes, URL-safe base64 without padding, never starting with '-'.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _cluster_id(state_dir: Path, nodes: Sequence[KafkaNode]) -> str:
    """The id the nodes formatted so far carry (all nodes of a cluster must share it), else a new one."""
    for node in nodes:
        meta = node_home(state_dir, node.node_id) / "data" / "meta.properties"
        with contextlib.suppress(OSError):
            if match := re.search(r"^cluster\.id=(\S+)$", meta.read_text(), re.MULTILINE):
                return match.group(1)
    return _new_cluster_id()


def _replication_props(brokers: int) -> dict[str, str]:
    """Defaults for every topic, the internal ones included: the worker's own rule (as many copies as
    brokers, up to three; two in sync from two copies up), so a topic created anyhow gets the same."""
    replication = replication_for(brokers)
    factor, min_isr = str(replication.replication_factor), str(replication.min_insync_replicas)
    return {
        "default.replication.factor": factor,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": factor,
        "transaction.state.log.replication.factor": factor,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": factor,
        "share.coordinator.state.topic.min.isr": min_isr,
    }


def _write_config(home: Path, node: KafkaNode, nodes: Sequence[KafkaNode]) -> Path:
    data = home / "data"
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(voter.voter for voter in nodes),
        "listeners": f"PLAINTEXT://{HOST}:{node.port},CONTROLLER://{HOST}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        **_replication_props(len(nodes)),
        "offsets.topic.num.partitions": "10",  # fewer than the default 50: faster first group join
        "transaction.state.log.num.partitions": "10",
        # Tests and demos join groups one consumer at a time; don't wait 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        # A development broker must not fill the disk: each partition keeps its newest 256 MiB (the
        # default keeps everything for 7 days, and a benchmark writes gigabytes an hour).
        "log.retention.bytes": str(256 * 1024 * 1024),
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    config = home / "server.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
    (home / "log4j2.xml").write_text(
        _LOG4J2_XML.format(
            log=html.escape(f'"{logs / "server.log"}"', quote=False),
            pattern=html.escape(f'"{logs / "server.log.%i"}"', quote=False),
        )
    )
    return config


def _java_base(java: str, libs: Path, home: Path) -> list[str]:
    return [
        java,
        *JVM_HEAP,
        JVM_GC,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={home / 'logs'}",
        "-cp",
        f"{libs}/*",
    ]


def _format_storage(java: str, libs: Path, home: Path, config: Path, cluster_id: str) -> None:
    if (home / "data" / "meta.properties").exists():
        return  # formatted by an earlier `up`: keep its topics and offsets
    result = subprocess.run(
        [
            *_java_base(java, libs, home),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(config),
            "--ignore-formatted",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(f"Kafka storage format failed:\n{result.stdout}{result.stderr}")


def is_formatted(state_dir: Path, node_id: int) -> bool:
    """Has this node data from an earlier `up` (topics, offsets, the quorum's log)?"""
    return (node_home(state_dir, node_id) / "data" / "meta.properties").exists()


def start(state_dir: Path, nodes: Sequence[KafkaNode], node_id: int) -> KafkaInstance:
    """Fetch (once), configure, format (once) and launch node `node_id` of the cluster `nodes`; returns
    without waiting. A node that ran before comes back with its data."""
    java = java_command()
    libs = ensure_distribution()
    node = next(node for node in nodes if node.node_id == node_id)
    home = node_home(state_dir, node_id)
    for taken in (node.port, node.controller_port):
        if port_in_use(HOST, taken):
            raise ServiceError(f"Port {taken} on {HOST} is already in use; pick another --kafka-port.")
    config = _write_config(home, node, nodes)
    _format_storage(java, libs, home, config, _cluster_id(state_dir, nodes))
    cmd = [*_java_base(java, libs, home), "kafka.Kafka", str(config)]
    # The config path is in the command line: it tells our broker apart from any other JVM.
    process = spawn("kafka", cmd, home / "kafka.out", marker=str(config), cwd=home)
    return KafkaInstance(process, node)


def _run_sync(factory: Callable[[], Awaitable[_T]]) -> _T:
    async def runner() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(runner())
    # Called from inside an event loop (e.g. an async test): use a private loop in a thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


async def _metadata_ready(bootstrap: str, node_id: int | None) -> bool:
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        # Serving metadata that lists it as a broker (registered and unfenced, so caught up with the
        # quorum's log) and names a controller: ready for clients.
        brokers = {broker.nodeId for broker in client.cluster.brokers()}
        listed = node_id in brokers if node_id is not None else bool(brokers)
        return listed and client.cluster.controller is not None
    except KafkaError:
        return False
    finally:
        await client.close()


def broker_answers(bootstrap: str, node_id: int | None = None) -> bool:
    """Does the broker at `bootstrap` serve metadata (listing node `node_id` as a live broker, if given)?"""
    host, _, port = bootstrap.rpartition(":")
    if not port_in_use(host, int(port)):
        return False
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # connection errors while booting are expected noise
    try:
        return _run_sync(lambda: _metadata_ready(bootstrap, node_id))
    finally:
        aiokafka_log.setLevel(level)


def wait_ready(instance: KafkaInstance, state_dir: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Until the node serves clients; a node of a cluster also needs a majority of its controllers up."""
    home = node_home(state_dir, instance.node.node_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(instance.process):
            raise EndedDuringStartup(
                f"Kafka node {instance.node.node_id} {describe_exit(instance.process)} during startup.\n"
                f"Last lines of {home / 'kafka.out'} and server.log:\n"
                f"{tail(home / 'kafka.out', 20)}\n{tail(home / 'logs' / 'server.log')}"
            )
        if broker_answers(instance.bootstrap, instance.node.node_id):
            return
        time.sleep(0.3)
    raise ServiceError(
        f"Kafka node {instance.node.node_id} did not answer on {instance.bootstrap} within {timeout:.0f}s. "
        f"Last lines of {home / 'logs' / 'server.log'}:\n{tail(home / 'logs' / 'server.log')}"
    )


def active_controller(state_dir: Path, node_ids: Sequence[int]) -> int | None:
    """The quorum's leader (the active controller), from the quorum state each node keeps on disk: the
    leader of the newest epoch any node knows. None while no node knows one. aiokafka has no
    DescribeQuorum, and the metadata's controller id is any broker in KRaft."""
    newest: tuple[int, int] | None = None  # (epoch, leader)
    for node_id in node_ids:
        path = node_home(state_dir, node_id) / "data" / "__cluster_metadata-0" / "quorum-state"
        try:
            quorum = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        epoch, leader = int(quorum.get("leaderEpoch", -1)), int(quorum.get("leaderId", -1))
        if leader >= 0 and (newest is None or epoch > newest[0]):
            newest = (epoch, leader)
    return newest[1] if newest else None
