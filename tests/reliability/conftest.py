"""Fault harness fixtures: the tiny model (for `score_ids`), real worker processes, and services of a
test's own where the fault would disturb the shared ones (a Redis or a broker that gets restarted).

The shared `kafka_bootstrap` / `redis_url` session services come from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from processor.local import services
from processor.model import GuardModel, load_guard_model

from .workers import WorkerConfig, WorkerPool


@pytest.fixture(scope="session")
def model(tiny_model_dir: Path) -> GuardModel:
    """The same checkpoint the worker processes load: scoring with it is the reference."""
    return load_guard_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture
def worker_config(tiny_model_dir: Path, topic_prefix: str, redis_prefix: str) -> Callable[..., WorkerConfig]:
    def build(kafka_bootstrap: str, redis_url: str, **overrides) -> WorkerConfig:
        return WorkerConfig(
            kafka_bootstrap, redis_url, tiny_model_dir, topic_prefix, redis_prefix, **overrides
        )

    return build


@pytest.fixture
def pool(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[WorkerConfig], WorkerPool]]:
    """Worker processes of one test; all stopped at its end, their logs printed when it failed."""
    pools: list[WorkerPool] = []

    def create(config: WorkerConfig) -> WorkerPool:
        pools.append(WorkerPool(config, tmp_path / "workers"))
        return pools[-1]

    yield create
    for worker_pool in pools:
        worker_pool.close()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for worker_pool in pools:
            for worker in worker_pool.workers:
                code = worker.process.returncode
                print(f"\n--- worker {worker.worker_id} (exit {code}) ---\n{worker.tail(60)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@dataclass
class LocalService:
    """One service of a state folder of its own, which the test may stop, pause and start again."""

    name: str
    state_dir: Path
    address: str

    def pid(self) -> int:
        return int(services.status(self.state_dir)[self.name]["pid"])

    def stop(self) -> None:
        """Graceful stop (SIGTERM): Redis writes its append-only file, Kafka flushes its logs."""
        services.down(self.state_dir, [self.name])

    def start(self) -> None:
        """Same port and data folder as before (the port is free again, so it is reused)."""
        entries, _ = services.ensure(self.state_dir, [self.name])
        entry = entries[self.name]
        address = str(entry["bootstrap"] if self.name == "kafka" else entry["url"])
        assert address == self.address, f"{self.name} came back on {address}, not {self.address}"

    async def restart(self, down_seconds: float) -> None:
        await asyncio.to_thread(self.stop)
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(self.start)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server or a network black hole)."""
        os.kill(self.pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid(), signal.SIGCONT)


def _dedicated(name: str, state_dir: Path) -> Iterator[LocalService]:
    entries, _ = services.ensure(state_dir, [name])
    entry = entries[name]
    service = LocalService(name, state_dir, str(entry["bootstrap"] if name == "kafka" else entry["url"]))
    try:
        yield service
    finally:
        with contextlib.suppress(Exception):
            service.resume()
        services.down(state_dir, [name])


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[LocalService]:
    """A Redis of this test's own, with append-only persistence, as `guardstream local` runs it."""
    yield from _dedicated("redis", tmp_path / "own-redis")


@pytest.fixture
def dedicated_kafka(tmp_path: Path) -> Iterator[LocalService]:
    """A broker of this test's own: restarting the shared one would disturb every other test."""
    yield from _dedicated("kafka", tmp_path / "own-kafka")
