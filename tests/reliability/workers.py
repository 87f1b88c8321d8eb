"""Real `guardstream worker` processes for fault tests and the soak: start, wait until they own
partitions, kill, stop, and read their metrics, logs and memory.

Each worker runs in a session of its own, so a SIGKILL reaches that worker and nothing else. Settings go
through GUARDSTREAM_* variables, exactly as a deployment would pass them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from processor.local.process import free_port

ROOT = Path(__file__).resolve().parents[2]
# Loading torch and the model takes seconds, more on a busy 2-core machine.
START_TIMEOUT_S = 90.0
_ASSIGNED = re.compile(r"partitions assigned: \[([0-9, ]*)\]")
_REVOKED = re.compile(r"partitions revoked: \[([0-9, ]*)\]")


def guardstream_command() -> list[str]:
    """The installed `guardstream` script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "guardstream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "processor.cli"]


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of one scenario shares; `environment` adds or overrides GUARDSTREAM_* values."""

    kafka_bootstrap: str
    redis_url: str
    model_dir: Path
    topic_prefix: str
    redis_prefix: str
    partitions: int = 6
    kv_cache_bytes: int = 32 * 1024 * 1024
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_topic(self) -> str:
        return f"{self.topic_prefix}.tokens"

    @property
    def verdicts_topic(self) -> str:
        return f"{self.topic_prefix}.verdicts"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def group_id(self) -> str:
        return f"{self.topic_prefix}.workers"

    def env(self, worker_id: str, http_port: int) -> dict[str, str]:
        values = {
            "KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "REDIS_URL": self.redis_url,
            "MODEL": str(self.model_dir),
            "DEVICE": "cpu",
            "DTYPE": "float32",
            "TOKENS_TOPIC": self.tokens_topic,
            "VERDICTS_TOPIC": self.verdicts_topic,
            "DLQ_TOPIC": self.dlq_topic,
            "GROUP_ID": self.group_id,
            "PARTITIONS": str(self.partitions),
            "REDIS_KEY_PREFIX": self.redis_prefix,
            "HTTP_PORT": str(http_port),
            "WORKER_ID": worker_id,
            "KV_CACHE_BYTES": str(self.kv_cache_bytes),
            "POLL_TIMEOUT_MS": "20",
        } | self.environment
        # One torch thread per worker: several share two cores with Kafka and the test itself.
        return (
            os.environ
            | {f"GUARDSTREAM_{key}": value for key, value in values.items()}
            | {
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a worker's /metrics, /healthz or /readyz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def read_metric(port: int, name: str) -> float:
    """Sum of a metric's samples on a worker's /metrics (0 when absent)."""
    _, body = http_get(port, "/metrics")
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


class WorkerProcess:
    def __init__(self, config: WorkerConfig, worker_id: str, log_dir: Path) -> None:
        self.config = config
        self.worker_id = worker_id
        self.http_port = free_port()
        self.log_path = log_dir / f"{worker_id}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*guardstream_command(), "worker", "--log-level", "INFO"],
                cwd=ROOT,
                env=config.env(worker_id, self.http_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def assigned(self) -> list[int] | None:
        """Partitions of the last assignment, [] after a revocation with none since; None before any."""
        last: list[int] | None = None
        for line in self.log().splitlines():
            if match := _ASSIGNED.search(line):
                last = [int(part) for part in match.group(1).split(",") if part.strip()]
            elif _REVOKED.search(line) and last is not None:
                last = []
        return last

    async def wait_assigned(self, timeout: float = START_TIMEOUT_S) -> list[int]:
        """Waits until the worker owns at least one partition (it loaded the model and joined)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"worker {self.worker_id} exited with {self.process.returncode}:\n{self.tail()}"
                )
            partitions = self.assigned()
            if partitions:
                return partitions
            await asyncio.sleep(0.2)
        raise TimeoutError(f"worker {self.worker_id} owns no partition after {timeout:.0f}s:\n{self.tail()}")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        return http_get(self.http_port, path, timeout)

    def metric(self, name: str) -> float:
        return read_metric(self.http_port, name)

    def rss_bytes(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        """SIGKILL: no step finishes, nothing is committed, the group notices after its session timeout."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    async def terminate(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM and wait; returns (exit code, seconds to exit). Kills it if it overstays `timeout`."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        while self.alive() and time.monotonic() - started < timeout:
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - started
        if self.alive():
            self.kill()
        return self.process.wait(), seconds

    def close(self) -> None:
        """Synchronous stop for cleanup paths: SIGTERM, then SIGKILL after 20 s."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


async def wait_balanced(workers: list[WorkerProcess], partitions: int, timeout: float = 120.0) -> None:
    """Until the workers own disjoint, non-empty shares that cover every partition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.worker_id} exited:\n{worker.tail()}")
        shares = [worker.assigned() or [] for worker in workers]
        owned = [partition for share in shares for partition in share]
        if all(shares) and sorted(owned) == list(range(partitions)):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"partitions not balanced after {timeout:.0f}s: {[w.assigned() for w in workers]}")


class WorkerPool:
    """The workers of one scenario; every one still running is stopped on close."""

    def __init__(self, config: WorkerConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []

    def start(self, *worker_ids: str) -> list[WorkerProcess]:
        started = [WorkerProcess(self.config, worker_id, self.log_dir) for worker_id in worker_ids]
        self.workers += started
        return started

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
