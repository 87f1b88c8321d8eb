"""Faults under load, with real worker processes against real Kafka and Redis.

Every test streams several conversations one token per event, injects its fault mid-stream, and then
checks (load.check_delivery) that every token event has its verdict, positions are contiguous, and the
labels equal `score_ids` on each whole conversation; duplicated verdicts are counted and recorded in
bench/results/reliability.json (the source of docs/reliability.md).

    .venv/bin/pytest -q tests/reliability/test_faults.py -s     # -s prints each fault's figures
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from tests.worker.harness import running_worker, worker_settings

from .load import VerdictRecorder, committed_offsets, finish_and_check, steady_load
from .workers import free_port, read_metric, wait_balanced

pytestmark = [pytest.mark.integration]

PARTITIONS = 6


@pytest.mark.timeout(240)
async def test_sigkill_one_of_two_workers(model, worker_config, pool, kafka_bootstrap, redis_url):
    """The survivor takes the killed worker's partitions after the session timeout and rebuilds those
    conversations' KV caches from the Redis token history."""
    config = worker_config(kafka_bootstrap, redis_url, partitions=PARTITIONS)
    workers = pool(config)
    survivor, victim = workers.start("survivor", "victim")
    await wait_balanced([survivor, victim], PARTITIONS)
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        killed_at = time.time()
        victim.kill()
        await asyncio.sleep(16)  # past aiokafka's 10 s session timeout, still streaming
        assert survivor.alive()
        await finish_and_check(
            "worker SIGKILL (1 of 2)",
            model,
            load,
            streaming,
            recorder,
            killed_at,
            what="survivor took the partitions after the session timeout, rebuilt from Redis",
            rebuilt_tokens=lambda: survivor.metric("guardstream_rebuilt_tokens"),
        )
    assert survivor.metric("guardstream_rebuilt_tokens") > 0, "the survivor never rebuilt a conversation"
    assert sorted(survivor.assigned() or []) == list(range(PARTITIONS))


@pytest.mark.timeout(300)
async def test_scale_one_three_one(model, worker_config, pool, kafka_bootstrap, redis_url):
    """Two workers join under load, then leave with SIGTERM: every rebalance commits before it lets go."""
    config = worker_config(kafka_bootstrap, redis_url, partitions=PARTITIONS)
    workers = pool(config)
    (first,) = workers.start("first")
    await first.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=1)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        joined_at = time.time()
        second, third = workers.start("second", "third")
        await wait_balanced([first, second, third], PARTITIONS)
        scaled_up_s = time.time() - joined_at
        await asyncio.sleep(4)
        left_at = time.time()
        exits = await asyncio.gather(second.terminate(timeout=30), third.terminate(timeout=30))
        await wait_balanced([first], PARTITIONS, timeout=60)
        scaled_down_s = time.time() - left_at
        await asyncio.sleep(3)
        delivery = await finish_and_check(
            "scale 1 -> 3 -> 1 (SIGTERM leaves)",
            model,
            load,
            streaming,
            recorder,
            left_at,
            what="joins and graceful leaves rebalanced; leavers committed before letting go",
            scale_up_s=round(scaled_up_s, 2),
            scale_down_s=round(scaled_down_s, 2),
            leaver_exits=[code for code, _ in exits],
        )
    assert [code for code, _ in exits] == [0, 0]
    assert delivery.duplicates == 0, "a graceful rebalance re-published verdicts"


@pytest.mark.timeout(240)
async def test_a_join_rebuilds_only_the_conversations_that_moved(
    model, worker_config, pool, kafka_bootstrap, redis_url
):
    """A second worker joins under load. Round robin leaves the first half its partitions, and it keeps
    those conversations' KV caches over the rebalance: it rebuilds nothing, while the newcomer
    rebuilds the conversations it took over from their Redis histories."""
    config = worker_config(kafka_bootstrap, redis_url, partitions=PARTITIONS)
    workers = pool(config)
    (first,) = workers.start("first")
    await first.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=6)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(4)
        joined_at = time.time()
        (second,) = workers.start("second")
        await wait_balanced([first, second], PARTITIONS)
        kept = first.assigned() or []
        await asyncio.sleep(4)
        await finish_and_check(
            "a worker joins: only moved conversations rebuilt",
            model,
            load,
            streaming,
            recorder,
            joined_at,
            what="the first worker kept the KV caches of the conversations it kept",
            first_rebuilt_tokens=lambda: first.metric("guardstream_rebuilt_tokens"),
            second_rebuilt_tokens=lambda: second.metric("guardstream_rebuilt_tokens"),
        )
    assert 0 < len(kept) < PARTITIONS
    assert first.metric("guardstream_rebuilt_tokens") == 0, "the first worker rebuilt conversations it kept"
    assert second.metric("guardstream_rebuilt_tokens") > 0, "the newcomer took over no conversation"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["paused", "restarted"])
async def test_redis_outage(model, worker_config, pool, kafka_bootstrap, dedicated_redis, fault):
    """Redis hangs (SIGSTOP, 6 s) or restarts (graceful stop, 4 s down, AOF reload): the worker stops
    committing, waits the outage out and resumes; nothing is lost."""
    # A hung Redis is noticed after --redis-timeout; 2 s keeps that well inside the 6 s pause.
    config = worker_config(
        kafka_bootstrap, dedicated_redis.address, partitions=PARTITIONS, environment={"REDIS_TIMEOUT": "2"}
    )
    (worker,) = pool(config).start("worker")
    await worker.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=2)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(4)
        started_at = time.time()
        if fault == "paused":
            dedicated_redis.pause()
            await asyncio.sleep(1.5)
            committed = await committed_offsets(config.kafka_bootstrap, config.group_id)
            await asyncio.sleep(4.5)
            committed_late = await committed_offsets(config.kafka_bootstrap, config.group_id)
            dedicated_redis.resume()
        else:
            await asyncio.to_thread(dedicated_redis.stop)
            await asyncio.sleep(1.5)
            committed = await committed_offsets(config.kafka_bootstrap, config.group_id)
            ready_during = worker.get("/readyz")[0]
            await asyncio.sleep(2.5)
            committed_late = await committed_offsets(config.kafka_bootstrap, config.group_id)
            await asyncio.to_thread(dedicated_redis.start)
        resumed_at = time.time()
        await asyncio.sleep(4)
        assert worker.alive(), worker.tail()
        await finish_and_check(
            f"Redis {fault}",
            model,
            load,
            streaming,
            recorder,
            resumed_at,
            what=(
                "SIGSTOP for 6 s: no commit while it hung, resumed after SIGCONT"
                if fault == "paused"
                else "stopped (AOF written), down 4 s, started on the same port and data: no commit "
                "while down, retried with backoff, resumed"
            ),
            outage_s=round(resumed_at - started_at, 2),
            redis_retries=lambda: worker.log().count("retrying in"),
        )
    assert committed_late == committed, "the worker committed offsets while Redis was unreachable"
    assert "retrying in" in worker.log(), "the outage never reached the worker's retry loop"
    if fault == "restarted":
        assert ready_during == 503, "/readyz should say not ready while Redis is down"


@pytest.mark.timeout(300)
async def test_kafka_broker_restart(model, worker_config, pool, redis_url, dedicated_kafka):
    """The broker stops (graceful) and starts again on the same port and data: the worker reconnects
    and resumes from its committed offsets."""
    config = worker_config(dedicated_kafka.address, redis_url, partitions=PARTITIONS)
    (worker,) = pool(config).start("worker")
    await worker.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=3)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(4)
        started_at = time.time()
        await dedicated_kafka.restart(down_seconds=3)
        resumed_at = time.time()
        await asyncio.sleep(6)
        assert worker.alive(), worker.tail()
        await finish_and_check(
            "Kafka broker restarted",
            model,
            load,
            streaming,
            recorder,
            resumed_at,
            timeout=120,
            what="broker stopped, down 3 s, started on the same port and data; worker reconnected",
            outage_s=round(resumed_at - started_at, 2),
            step_failures=lambda: worker.metric("guardstream_step_failures_total"),
        )


def default_cache_dtype(model) -> torch.dtype:
    """What the worker's cache stores on this CPU by default (auto: float16 where the kernel reads it)."""
    return resolve_attention_and_cache("auto", "auto", model.device, model.dtype)[1]


@pytest.mark.timeout(180)
async def test_kv_cache_far_below_active_set(model, kafka_bootstrap, redis_url, topic_prefix, redis_prefix):
    """Room for two conversations' caches, eight streaming: every step evicts and rebuilds from Redis."""
    blocks = 6  # of 16 tokens: a whole conversation (about 80 tokens) fits, two at most at once
    http_port = free_port()
    settings = worker_settings(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        redis_prefix,
        partitions=PARTITIONS,
        kv_cache_bytes=blocks * 16 * bytes_per_token(model.config, default_cache_dtype(model)),
        http_port=http_port,
    )
    async with running_worker(settings, model) as serving:
        async with VerdictRecorder(settings.kafka_bootstrap, settings.verdicts_topic) as recorder:
            load = steady_load(settings, seed=4, rate=8.0, max_assistant_tokens=60)
            streaming = asyncio.create_task(load.run())
            await asyncio.wait_for(asyncio.shield(streaming), timeout=60)  # it ends at 60 assistant tokens
            await recorder.wait_ended({c.conversation_id for c in load.conversations}, timeout=90)
            # In-process: the metrics server shares this event loop, so read it from a thread.
            evictions = await _metric(http_port, "guardstream_evictions")
            rebuilt = await _metric(http_port, "guardstream_rebuilt_tokens")
            aged = await _metric(http_port, "guardstream_event_age_seconds_count")
            age_seconds = await _metric(http_port, "guardstream_event_age_seconds_sum")
            await finish_and_check(
                "KV cache 6 blocks for 8 conversations",
                model,
                load,
                streaming,
                recorder,
                None,  # no outage: the check is that results stay exact
                what="constant eviction and rebuild from the Redis history",
                evictions=evictions,
                rebuilt_tokens=rebuilt,
            )
        assert not serving.done()
    assert evictions > 50 and rebuilt > 500, (evictions, rebuilt)
    # Every event's age at decode observed (once, or again if a step was redone), and a plausible one.
    assert aged >= load.sent and 0 < age_seconds / aged < 10, (aged, load.sent, age_seconds)


@pytest.mark.timeout(240)
async def test_sigterm_finishes_step_and_exits(
    model, worker_config, pool, kafka_bootstrap, redis_url, topic_prefix, redis_prefix
):
    """SIGTERM mid-stream: exit code 0 within a bound, and a successor re-publishes nothing (the last
    step's verdicts were published and its offsets committed before the exit)."""
    config = worker_config(kafka_bootstrap, redis_url, partitions=PARTITIONS)
    (worker,) = pool(config).start("leaving")
    await worker.wait_assigned()
    async with VerdictRecorder(config.kafka_bootstrap, config.verdicts_topic) as recorder:
        load = steady_load(config, seed=5)
        streaming = asyncio.create_task(load.run())
        await asyncio.sleep(5)
        code, seconds = await worker.terminate(timeout=30)
        successor = worker_settings(
            kafka_bootstrap,
            redis_url,
            topic_prefix,
            redis_prefix,
            partitions=PARTITIONS,
            worker_id="successor",
        )
        async with running_worker(successor, model):
            resumed_at = time.time()
            await asyncio.sleep(3)
            delivery = await finish_and_check(
                "worker SIGTERM",
                model,
                load,
                streaming,
                recorder,
                resumed_at,
                what="finished the step in flight, published, committed, left the group, exit 0",
                exit_code=code,
                exit_s=round(seconds, 2),
            )
    assert code == 0, worker.tail()
    assert seconds < 15, f"SIGTERM took {seconds:.1f}s"
    assert delivery.duplicates == 0, "the successor re-published verdicts: the leaver had not committed"


async def _metric(port: int, name: str) -> float:
    return await asyncio.to_thread(read_metric, port, name)
