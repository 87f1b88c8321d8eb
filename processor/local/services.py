"""Bring the local Kafka + Redis pair up and down, remembering exactly what was started in a state folder.

State folder layout: `services.json` (pids, ports), `env` (KAFKA_BOOTSTRAP / REDIS_URL for shells),
`kafka/`, `redis/` and `redis-cluster-N/` (data and logs; kept across `down`, like a real deployment's
volumes). "redis-cluster" is a Redis Cluster of six nodes (processor/local/redis_cluster.py) that
`up --redis-cluster` starts instead of the single Redis. A Kafka cluster (`up --brokers 3`) keeps
node 1 in `kafka/` and the others in `kafka-2/`, `kafka-3/`, ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processor.local import kafka as kafka_service
from processor.local import redis as redis_service
from processor.local import redis_cluster
from processor.local.process import (
    EndedDuringStartup,
    ManagedProcess,
    ServiceError,
    free_port,
    is_running,
    port_in_use,
    stop_all,
)

STATE_FILE = "services.json"
ENV_FILE = "env"
SERVICES = ("kafka", "redis", "redis-cluster")
_ADDRESS_KEY = {"kafka": "bootstrap", "redis": "url", "redis-cluster": "url"}

__all__ = ["SERVICES", "LocalServices", "ServiceError", "down", "ensure", "env_lines", "status", "up"]


@dataclass
class LocalServices:
    kafka_bootstrap: str
    redis_url: str
    redis_cluster: bool = False
    pids: dict[str, int] = field(default_factory=dict)  # the first process of each service
    reused: bool = False  # True when `up` found everything already running


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    # Two `up`s racing on one state folder would start two brokers; serialise them.
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def _reusable(port: int | None) -> int | None:
    """Last run's port when still free: a restarted service keeps the address in `env`."""
    return port if port and not port_in_use("127.0.0.1", port) else None


def _records(name: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a service's processes are recorded: one per node of a cluster (Kafka, the Redis Cluster)
    under `nodes`, else the entry itself (Redis, and a single broker as state files without `nodes`
    hold it, as node 1)."""
    if "nodes" in entry:
        return list(entry["nodes"])
    return [entry] if entry else []


def _record_running(record: dict[str, Any]) -> bool:
    return "process" in record and is_running(ManagedProcess.from_dict(record["process"]))


def _running(name: str, entry: dict[str, Any] | None) -> bool:
    """Every recorded process of the service runs: a cluster with a node down is not running."""
    records = _records(name, entry or {})
    return bool(records) and all(_record_running(record) for record in records)


def _kafka_nodes(records: list[dict[str, Any]]) -> list[kafka_service.KafkaNode]:
    return [
        kafka_service.KafkaNode(record.get("node_id", 1), record["port"], record["controller_port"])
        for record in records
    ]


def _plan_kafka(
    state_dir: Path, records: list[dict[str, Any]], port: int | None, brokers: int | None
) -> list[kafka_service.KafkaNode]:
    """Every node's ports. While any node runs, the quorum's addresses are fixed and each node keeps
    its own; otherwise a recorded port is reused when free, so `env` keeps its address."""
    count = brokers or len(records) or 1
    if any(_record_running(record) for record in records):
        if count != len(records):
            raise ServiceError(
                f"Kafka already runs {len(records)} broker(s) for {state_dir} (one is down); "
                f"run `guardstream local down` first to change --brokers to {count}."
            )
        return _kafka_nodes(records)
    if records and count != len(records) and kafka_service.is_formatted(state_dir, 1):
        raise ServiceError(
            f"The Kafka data in {state_dir} belongs to {len(records)} broker(s), not {count}. "
            f"Use another --state-dir, or delete {state_dir}/kafka* to start a new cluster there."
        )
    recorded = {record.get("node_id", 1): record for record in records}
    taken: set[int] = {port} if port else set()

    def pick(previous: int | None) -> int:
        chosen = _reusable(previous) if previous not in taken else None
        while chosen is None or chosen in taken:
            chosen = free_port()
        taken.add(chosen)
        return chosen

    nodes = []
    for node_id in range(1, count + 1):
        prior = recorded.get(node_id, {})
        node_port = port if node_id == 1 and port else pick(prior.get("port"))
        nodes.append(kafka_service.KafkaNode(node_id, node_port, pick(prior.get("controller_port"))))
    return nodes


def _start_kafka(
    state_dir: Path, port: int | None, prior: dict[str, Any], brokers: int | None
) -> tuple[dict[str, Any], list[ManagedProcess]]:
    """Start the nodes that are not running: all of them, or one that died or was stopped, which
    comes back on its own ports with its data."""
    records = _records("kafka", prior)
    nodes = _plan_kafka(state_dir, records, port, brokers)
    running = {record.get("node_id", 1): record["process"] for record in records if _record_running(record)}
    started: list[ManagedProcess] = []
    entry_nodes = []
    try:
        for node in nodes:
            process = running.get(node.node_id)
            if process is None:
                started.append(kafka_service.start(state_dir, nodes, node.node_id).process)
                process = started[-1].to_dict()
            entry_nodes.append(
                {
                    "node_id": node.node_id,
                    "port": node.port,
                    "controller_port": node.controller_port,
                    "process": process,
                }
            )
    except BaseException:
        stop_all(started)  # nothing recorded them yet
        raise
    return {"bootstrap": kafka_service.bootstrap_servers(nodes), "nodes": entry_nodes}, started


def _start(
    state_dir: Path, name: str, port: int | None, prior: dict[str, Any], brokers: int | None
) -> tuple[dict[str, Any], list[ManagedProcess]]:
    """Start what of the service is not running; returns its state entry and the processes started."""
    if name == "kafka":
        return _start_kafka(state_dir, port, prior, brokers)
    if name == "redis-cluster":
        return _start_redis_cluster(state_dir, port, prior)
    redis = redis_service.start(state_dir, port or _reusable(prior.get("port")))
    return {"process": redis.process.to_dict(), "port": redis.port, "url": redis.url}, [redis.process]


def _start_redis_cluster(
    state_dir: Path, port: int | None, prior: dict[str, Any]
) -> tuple[dict[str, Any], list[ManagedProcess]]:
    """Start the nodes that are not running, each on its recorded port: the cluster the nodes recorded
    (their nodes.conf) names them by address. `port` is the first node's; the others follow it."""
    nodes = _records("redis-cluster", prior) or [{} for _ in range(redis_cluster.NODES)]
    first = port or nodes[0].get("port")
    started: list[ManagedProcess] = []
    try:
        for index, node in enumerate(nodes):
            if _record_running(node):
                continue
            wanted = node.get("port") or (first + index if first else None)
            if wanted and port_in_use(redis_service.HOST, wanted):
                raise ServiceError(
                    f"port {wanted} of Redis Cluster node {index + 1} is taken; free it, or start over "
                    "with another --state-dir"
                )
            instance = redis_cluster.start_node(state_dir, index, wanted)
            started.append(instance.process)
            nodes[index] = {"process": instance.process.to_dict(), "port": instance.port}
    except BaseException:
        stop_all(started)  # nothing recorded them yet
        raise
    return {"nodes": nodes, "url": f"redis://{redis_service.HOST}:{nodes[0]['port']}/0"}, started


def _wait(state_dir: Path, name: str, entry: dict[str, Any]) -> None:
    if name == "redis-cluster":
        nodes = tuple(
            redis_service.RedisInstance(
                ManagedProcess.from_dict(record["process"]), record["port"], redis_cluster.node_name(index)
            )
            for index, record in enumerate(entry["nodes"])
        )
        redis_cluster.wait_ready(redis_cluster.RedisClusterInstance(nodes), state_dir)
        return
    if name == "kafka":
        for record, node in zip(entry["nodes"], _kafka_nodes(entry["nodes"]), strict=True):
            process = ManagedProcess.from_dict(record["process"])
            kafka_service.wait_ready(kafka_service.KafkaInstance(process, node), state_dir)
    else:
        process = ManagedProcess.from_dict(entry["process"])
        redis_service.wait_ready(redis_service.RedisInstance(process, entry["port"]), state_dir)


def _check_running_matches(
    state_dir: Path, name: str, entry: dict[str, Any], port: int | None, brokers: int | None
) -> None:
    """A running service is reused only as asked for: same port, same number of brokers."""
    records = _records(name, entry)
    if port and port != records[0]["port"]:
        raise ServiceError(
            f"{name} already runs on port {records[0]['port']} for {state_dir}; "
            f"run `guardstream local down` first to move it to {port}."
        )
    if name == "kafka" and brokers and brokers != len(records):
        raise ServiceError(
            f"Kafka already runs {len(records)} broker(s) for {state_dir}; "
            f"run `guardstream local down` first to change --brokers to {brokers}."
        )


def _forget(state: dict[str, Any], proc: ManagedProcess) -> None:
    for name in SERVICES:
        for record in _records(name, state.get(name) or {}):
            if record.get("process", {}).get("pid") == proc.pid:
                record.pop("process")


def _preflight(names: list[str]) -> None:
    """Report every missing prerequisite at once rather than one per attempt."""
    checks = {
        "kafka": kafka_service.preflight,
        "redis": redis_service.redis_server,
        "redis-cluster": redis_cluster.preflight,
    }
    problems = []
    for name in names:
        try:
            checks[name]()
        except ServiceError as error:
            problems.append(str(error))
    if problems:
        raise ServiceError("\n".join(problems))


def ensure(
    state_dir: Path | str,
    names: Iterable[str] = SERVICES,
    ports: dict[str, int | None] | None = None,
    brokers: int | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Start whichever of `names` is not already running; wait until all answer. `brokers`: Kafka's
    nodes (default: as many as this state folder recorded, else 1). A cluster with a node down has
    just that node started again, on its ports and with its data.

    Returns (state entries by name, whether anything was started). On failure, stops what this call
    started (what was already running stays) and re-raises.
    """
    state_dir = Path(state_dir).resolve()
    ports = ports or {}
    # Kafka first: the JVM is the slow one, Redis comes up while it boots.
    wanted = [name for name in SERVICES if name in set(names)]
    with _locked(state_dir):
        state = _load(state_dir)
        _preflight([name for name in wanted if not _running(name, state.get(name))])
        started: list[ManagedProcess] = []
        started_names: set[str] = set()
        try:
            for name in wanted:
                entry = state.get(name) or {}
                if _running(name, entry):
                    _check_running_matches(state_dir, name, entry, ports.get(name), brokers)
                    continue
                state[name], new = _start(state_dir, name, ports.get(name), entry, brokers)
                started += new
                started_names.add(name)
                _save(state_dir, state)  # record the pids at once so `down` can always find them
            for name in wanted:
                try:
                    _wait(state_dir, name, state[name])
                except EndedDuringStartup as error:
                    if name not in started_names:
                        raise
                    # One more try: a port taken between picking and binding it, or a stray signal,
                    # should not fail a whole test session. A second failure is reported as is.
                    print(
                        f"guardstream local: {str(error).splitlines()[0]} Starting it once more.",
                        file=sys.stderr,
                        flush=True,
                    )
                    state[name], new = _start(state_dir, name, ports.get(name), state[name], brokers)
                    started += new
                    _save(state_dir, state)
                    _wait(state_dir, name, state[name])
        except BaseException:
            stop_all(started)
            for proc in started:
                _forget(state, proc)
            _save(state_dir, state)
            raise
        return {name: state[name] for name in wanted}, bool(started)


def env_lines(services: LocalServices) -> list[str]:
    lines = [f"KAFKA_BOOTSTRAP={services.kafka_bootstrap}", f"REDIS_URL={services.redis_url}"]
    return [*lines, "REDIS_CLUSTER=1"] if services.redis_cluster else lines  # the worker's --redis-cluster


def up(
    state_dir: Path | str,
    kafka_port: int | None = None,
    redis_port: int | None = None,
    brokers: int | None = None,
    redis_cluster: bool = False,
) -> LocalServices:
    """Start (or reuse) Kafka and Redis (or a Redis Cluster) for `state_dir`; writes `env` there and
    returns the addresses. `brokers`: Kafka's nodes, `kafka_port` being the first's (default: as
    recorded, else 1)."""
    state_dir = Path(state_dir).resolve()
    redis = "redis-cluster" if redis_cluster else "redis"
    entries, started = ensure(state_dir, ["kafka", redis], {"kafka": kafka_port, redis: redis_port}, brokers)
    services = LocalServices(
        kafka_bootstrap=entries["kafka"]["bootstrap"],
        redis_url=entries[redis]["url"],
        redis_cluster=redis_cluster,
        pids={name: _records(name, entry)[0]["process"]["pid"] for name, entry in entries.items()},
        reused=not started,
    )
    (state_dir / ENV_FILE).write_text("".join(line + "\n" for line in env_lines(services)))
    return services


def down(state_dir: Path | str, names: Iterable[str] = SERVICES) -> list[str]:
    """Stop exactly the processes `up` recorded in `state_dir`; returns the names that were running."""
    state_dir = Path(state_dir).resolve()
    if not (state_dir / STATE_FILE).exists():
        return []
    names = set(names)
    with _locked(state_dir):
        state = _load(state_dir)
        stopped = []
        for name in SERVICES:  # Kafka first: it may still flush to disk; Redis has nothing waiting on it
            if name not in names:
                continue
            records = _records_with_process(state, name)
            if any(stop_all([ManagedProcess.from_dict(record.pop("process")) for record in records])):
                stopped.append(name)
        _save(state_dir, state)  # ports stay recorded: the next `up` reuses them when free
        if not any(_records_with_process(state, name) for name in SERVICES):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / ENV_FILE).unlink()
        return stopped


def _records_with_process(state: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [record for record in _records(name, state.get(name) or {}) if "process" in record]


def status(state_dir: Path | str) -> dict[str, dict[str, Any]]:
    """{'kafka': {'running': bool, 'pid': int | None, 'address': str, 'nodes': [...]}, 'redis': {...}};
    {} if never up. A cluster's (Kafka, the Redis Cluster) `nodes` list each node's id, running, pid
    and address; `pid` is node 1's."""
    state = _load(Path(state_dir).resolve())
    report: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        entry = state.get(name)
        if entry:
            report[name] = {
                "running": _running(name, entry),
                "pid": _records(name, entry)[0].get("process", {}).get("pid"),
                "address": entry[_ADDRESS_KEY[name]],
            }
            if "nodes" in entry:
                report[name]["nodes"] = [
                    _node_status(record, index + 1) for index, record in enumerate(_records(name, entry))
                ]
    return report


def _node_status(record: dict[str, Any], number: int) -> dict[str, Any]:
    return {
        "node_id": record.get("node_id", number),
        "running": _record_running(record),
        "pid": record.get("process", {}).get("pid"),
        "address": f"{kafka_service.HOST}:{record['port']}",
    }
