"""processor/worker/health.py: /healthz sees a hung step or a consumer that stopped fetching."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from processor.client import GuardProducer
from processor.engine import AsyncGuardEngine
from processor.local.process import free_port
from processor.model import load_guard_model
from processor.worker.health import StallWatch

from .harness import running_worker, worker_settings
from .test_http_dlq import get


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_step_under_way_past_the_bound_is_a_stall_until_a_step_ends():
    clock = Clock()
    watch = StallWatch(10, clock)
    watch.step_began()
    clock.now += 9
    assert watch.stall(holds_partitions=False) is None
    watch.step_began()  # a second step under way does not restart the clock
    clock.now += 2
    assert "no step has finished for 11 s with 2 under way" in watch.stall(holds_partitions=False)
    watch.step_ended()
    assert watch.stall(holds_partitions=False) is None
    clock.now += 11
    assert watch.stall(holds_partitions=False) is not None  # the other step is still under way
    watch.step_ended()
    clock.now += 60
    assert watch.stall(holds_partitions=False) is None  # idle is not stalled


def test_no_fetch_past_the_bound_is_a_stall_only_while_holding_partitions():
    clock = Clock()
    watch = StallWatch(10, clock)
    clock.now += 11
    assert watch.stall(holds_partitions=False) is None
    assert "has not fetched for 11 s while holding partitions" in watch.stall(holds_partitions=True)
    watch.fetched()
    assert watch.stall(holds_partitions=True) is None


@pytest.mark.integration
async def test_a_hung_engine_step_turns_healthz_red_within_the_bound_and_green_after(
    tiny_model_dir, kafka_bootstrap, redis_url, topic_prefix, redis_prefix, monkeypatch
):
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    port = free_port()
    settings = worker_settings(
        kafka_bootstrap, redis_url, topic_prefix, redis_prefix, http_port=port, stall_seconds=2
    )
    release, entered = asyncio.Event(), asyncio.Event()
    moderate_many = AsyncGuardEngine.moderate_many

    async def hung_moderate_many(self, requests):  # the test hook: the engine step hangs until released
        entered.set()
        await release.wait()
        return await moderate_many(self, requests)

    monkeypatch.setattr(AsyncGuardEngine, "moderate_many", hung_moderate_many)

    async def healthz_until(code: str, timeout: float) -> tuple[str, str, float]:
        started = time.monotonic()
        status, body = "no answer", ""
        while time.monotonic() - started < timeout:
            with contextlib.suppress(OSError):  # the health server is not listening yet
                status, body = await get(port, "/healthz")
            if code in status:
                break
            await asyncio.sleep(0.1)
        return status, body, time.monotonic() - started

    async with running_worker(settings, model):
        status, _, _ = await healthz_until("200", timeout=30)
        assert status.endswith("200 OK"), status
        async with GuardProducer(kafka_bootstrap, settings.tokens_topic) as producer:
            await producer.send_tokens("hung-1", "user", [9707, 11], end_of_turn=True, wait=True)
        await asyncio.wait_for(entered.wait(), timeout=30)
        status, body, waited = await healthz_until("503", timeout=settings.stall_seconds + 5)
        assert "503" in status, f"still {status} {waited:.1f} s into a hung step"
        assert body.startswith("stalled: no step has finished")
        release.set()
        status, _, _ = await healthz_until("200", timeout=15)
        assert status.endswith("200 OK")
