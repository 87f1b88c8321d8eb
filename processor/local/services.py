"""Bring the local Kafka + Redis pair up and down, remembering exactly what was started in a state folder.

State folder layout: `services.json` (pids, ports), `env` (KAFKA_BOOTSTRAP / REDIS_URL for shells),
`kafka/` and `redis/` (data and logs; kept across `down`, like a real deployment's volumes).
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
from processor.local.process import (
    EndedDuringStartup,
    ManagedProcess,
    ServiceError,
    is_running,
    port_in_use,
    stop,
)

STATE_FILE = "services.json"
ENV_FILE = "env"
SERVICES = ("kafka", "redis")
_ADDRESS_KEY = {"kafka": "bootstrap", "redis": "url"}

__all__ = ["SERVICES", "LocalServices", "ServiceError", "down", "ensure", "env_lines", "status", "up"]


@dataclass
class LocalServices:
    kafka_bootstrap: str
    redis_url: str
    pids: dict[str, int] = field(default_factory=dict)
    reused: bool = False  # True when `up` found both already running


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


def _running(entry: dict[str, Any] | None) -> bool:
    return bool(entry and "process" in entry and is_running(ManagedProcess.from_dict(entry["process"])))


def _start(state_dir: Path, name: str, port: int | None, prior: dict[str, Any]) -> dict[str, Any]:
    if name == "kafka":
        same_port = port in (None, prior.get("port"))
        kafka = kafka_service.start(
            state_dir,
            port or _reusable(prior.get("port")),
            _reusable(prior.get("controller_port")) if same_port else None,
        )
        return {
            "process": kafka.process.to_dict(),
            "port": kafka.port,
            "controller_port": kafka.controller_port,
            "bootstrap": kafka.bootstrap,
        }
    redis = redis_service.start(state_dir, port or _reusable(prior.get("port")))
    return {"process": redis.process.to_dict(), "port": redis.port, "url": redis.url}


def _wait(state_dir: Path, name: str, entry: dict[str, Any]) -> None:
    process = ManagedProcess.from_dict(entry["process"])
    if name == "kafka":
        instance = kafka_service.KafkaInstance(process, entry["port"], entry["controller_port"])
        kafka_service.wait_ready(instance, state_dir)
    else:
        redis_service.wait_ready(redis_service.RedisInstance(process, entry["port"]), state_dir)


def _preflight(names: list[str]) -> None:
    """Report every missing prerequisite at once rather than one per attempt."""
    checks = {"kafka": kafka_service.preflight, "redis": redis_service.redis_server}
    problems = []
    for name in names:
        try:
            checks[name]()
        except ServiceError as error:
            problems.append(str(error))
    if problems:
        raise ServiceError("\n".join(problems))


def ensure(
    state_dir: Path | str, names: Iterable[str] = SERVICES, ports: dict[str, int | None] | None = None
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Start whichever of `names` is not already running; wait until all answer.

    Returns (state entries by name, whether anything was started). On failure, stops what this call
    started (what was already running stays) and re-raises.
    """
    state_dir = Path(state_dir).resolve()
    ports = ports or {}
    # Kafka first: the JVM is the slow one, Redis comes up while it boots.
    wanted = [name for name in SERVICES if name in set(names)]
    with _locked(state_dir):
        state = _load(state_dir)
        _preflight([name for name in wanted if not _running(state.get(name))])
        started: list[ManagedProcess] = []
        try:
            for name in wanted:
                entry = state.get(name) or {}
                if _running(entry):
                    if ports.get(name) and ports[name] != entry["port"]:
                        raise ServiceError(
                            f"{name} already runs on port {entry['port']} for {state_dir}; "
                            f"run `guardstream local down` first to move it to {ports[name]}."
                        )
                    continue
                state[name] = _start(state_dir, name, ports.get(name), entry)
                started.append(ManagedProcess.from_dict(state[name]["process"]))
                _save(state_dir, state)  # record the pid at once so `down` can always find it
            started_names = {proc.name for proc in started}
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
                    state[name] = _start(state_dir, name, ports.get(name), state[name])
                    started.append(ManagedProcess.from_dict(state[name]["process"]))
                    _save(state_dir, state)
                    _wait(state_dir, name, state[name])
        except BaseException:
            for proc in started:
                stop(proc)
                state.get(proc.name, {}).pop("process", None)
            _save(state_dir, state)
            raise
        return {name: state[name] for name in wanted}, bool(started)


def env_lines(services: LocalServices) -> list[str]:
    return [f"KAFKA_BOOTSTRAP={services.kafka_bootstrap}", f"REDIS_URL={services.redis_url}"]


def up(state_dir: Path | str, kafka_port: int | None = None, redis_port: int | None = None) -> LocalServices:
    """Start (or reuse) Kafka and Redis for `state_dir`; writes `env` there and returns the addresses."""
    state_dir = Path(state_dir).resolve()
    entries, started = ensure(state_dir, SERVICES, {"kafka": kafka_port, "redis": redis_port})
    services = LocalServices(
        kafka_bootstrap=entries["kafka"]["bootstrap"],
        redis_url=entries["redis"]["url"],
        pids={name: entry["process"]["pid"] for name, entry in entries.items()},
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
            entry = state.get(name) or {}
            if name in names and "process" in entry and stop(ManagedProcess.from_dict(entry.pop("process"))):
                stopped.append(name)
        _save(state_dir, state)  # ports stay recorded: the next `up` reuses them when free
        if not any("process" in (state.get(name) or {}) for name in SERVICES):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / ENV_FILE).unlink()
        return stopped


def status(state_dir: Path | str) -> dict[str, dict[str, Any]]:
    """{'kafka': {'running': bool, 'pid': int | None, 'address': str}, 'redis': {...}}; {} if never up."""
    state = _load(Path(state_dir).resolve())
    report: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        entry = state.get(name)
        if entry:
            report[name] = {
                "running": _running(entry),
                "pid": entry.get("process", {}).get("pid"),
                "address": entry[_ADDRESS_KEY[name]],
            }
    return report
