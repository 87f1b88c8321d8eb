"""A local `redis-server` with append-only persistence, so session state survives a restart like in prod."""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from processor.local.process import (
    EndedDuringStartup,
    ManagedProcess,
    ServiceError,
    describe_exit,
    free_port,
    is_running,
    port_in_use,
    spawn,
    tail,
)

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RedisInstance:
    process: ManagedProcess
    port: int
    name: str = "redis"  # also its folder in the state folder

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


def redis_server() -> str:
    return redis_binary("redis-server", "redis-server")


def redis_binary(name: str, debian_package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ServiceError(
            f"`{name}` was not found on PATH.\n"
            f"Install it, e.g.: apt-get install {debian_package} (or brew install redis)"
        )
    return found


def start(
    state_dir: Path, port: int | None = None, name: str = "redis", extra_args: tuple[str, ...] = ()
) -> RedisInstance:
    binary = redis_server()
    home = state_dir / name
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(HOST)
    if port_in_use(HOST, port):
        raise ServiceError(f"Port {port} on {HOST} is already in use; pick another --redis-port.")
    cmd = [
        binary,
        "--bind",
        HOST,
        "--port",
        str(port),
        "--dir",
        str(home),
        "--appendonly",
        "yes",
        "--daemonize",
        "no",  # in the foreground of its own session: we hold its pid
        "--pidfile",
        str(home / "redis.pid"),
        "--logfile",
        str(home / "redis.log"),
        *extra_args,
    ]
    # redis-server rewrites its process title, but it always keeps its own name in it.
    process = spawn(name, cmd, home / "redis.out", marker="redis-server", cwd=home)
    return RedisInstance(process, port, name)


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """A raw RESP PING: no client library needed to tell that the server answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_ready(instance: RedisInstance, state_dir: Path, timeout: float = START_TIMEOUT_S) -> None:
    home = state_dir / instance.name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(instance.process):
            raise EndedDuringStartup(
                f"redis-server {describe_exit(instance.process)} during startup.\n"
                f"{tail(home / 'redis.log')}\n"
                f"{tail(home / 'redis.out')}"
            )
        if ping(HOST, instance.port):
            return
        time.sleep(0.1)
    raise ServiceError(
        f"redis-server did not answer PING on port {instance.port} within {timeout:.0f}s:\n"
        f"{tail(home / 'redis.log')}"
    )
