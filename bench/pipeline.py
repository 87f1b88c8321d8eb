"""Pipeline benchmark: the worker's throughput and latency through real Kafka and Redis, in one run.

Three measurements, printed as a table and written as JSON (bench/results/pipeline-<device>.json):

1. Raw ceiling, no model and no Redis: getmany -> json parse -> produce -> await acks -> commit,
   producing with one `AIOKafkaProducer.send` per record or with `BatchPublisher` (what the worker
   uses), both reading the same pre-filled topic, in alternating passes. Events/s.
2. Offered load through one worker process, at each rate of --rates in turn (fresh conversations per
   rate, each opened with a short user turn, then one assistant token per event, round robin). The
   generator sends every event that is due each --tick-ms with `BatchPublisher` (acks awaited at the
   end, not in the pacing loop), stamping "ts" with the time the event was due, so that the wait for
   the tick counts in its latency. Per rate: the offered rate achieved; sustained events/s (token
   verdicts received per second while the generator sent, after the first fifth of the rate's
   seconds: the offered rate when the worker kept pace, its own when it fell behind); whether
   everything was answered within --answer-timeout after the last event; the p50/p95/p99 latency from
   the event's ts to the verdict's receipt here, and the p50 of each second's events (flat: the worker
   kept pace; rising: a backlog grew). Before the next rate starts, a backlog gets up to another
   --answer-timeout to clear. Each phase deletes its topics when done.
3. Drain (--drain-events N, 0 skips it): the worker's maximum throughput. A fresh worker on fresh
   topics answers the user turns of its conversations (--drain-conversations, default
   --conversations), is frozen (SIGSTOP) while N assistant-token events are produced, then thawed, so
   it finds them all waiting:
   token verdicts/s from the first to the last.

Both the rates and the drain also report the worker's CPU time (all its threads, from /proc) per
answered event: steadier than events/s on this shared machine, and what a change to the worker moves.
The rates also report this process's own CPU per event (the generator and the verdict reader), and
the whole machine's (every process: worker, harness, broker, Redis) with the cores it kept busy: what
the worker shares its cores with, and whether the machine, not the worker alone, ran out of CPU.

    python bench/pipeline.py --model DIR --device cpu --rates 1000,5000,10000,20000,25000 --seconds 15 \\
        --conversations 200 --raw-events 100000 --drain-events 40000

Without --kafka-bootstrap / --redis-url it starts local services (processor.local) and stops them after.
On CPU, unless --kv-cache-bytes is given, each worker's KV cache is sized (from the checkpoint's
config.json) to hold every conversation of its phase, so that no eviction shows up in the figures.
The load generator, the verdict reader and the raw loops run in this process and share the machine
with the broker, Redis and the worker: compare figures from the same machine and the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from pydantic_core import from_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache  # noqa: E402
from processor.heap import long_lived_heap_frozen  # noqa: E402
from processor.local.process import free_port  # noqa: E402
from processor.model.config import GuardConfig  # noqa: E402
from processor.model.loader import default_dtype, parse_dtype  # noqa: E402
from processor.worker.metrics import STAGES  # noqa: E402
from processor.worker.publisher import BatchPublisher  # noqa: E402
from processor.worker.settings import KvCacheDtype, redact_url  # noqa: E402

DEFAULT_RATES = "1000,5000,10000,20000,25000"
USER_TURN = [9707, 11, 1246]  # the short user turn that opens every conversation
BLOCK_SIZE = 16  # the engine's KV block size (EngineConfig.block_size), for sizing the CPU cache
MIN_CPU_KV_CACHE_BYTES = 256 * 1024 * 1024


class WorkerExited(RuntimeError):
    pass


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


TAIL_WINDOW_SECONDS = 0.1


def tail_windows(sent_times: list[float], latencies: list[float]) -> tuple[int, int]:
    """(windows holding an event slower than p99, windows): the run cut into 100 ms windows by the
    events' ts. A tail spread over the run touches many windows; one made of a few stalls, few."""
    if not latencies:
        return 0, 0
    p99 = percentile(latencies, 0.99)
    first = min(sent_times)
    windows = {int((sent - first) / TAIL_WINDOW_SECONDS) for sent in sent_times}
    slow = {
        int((sent - first) / TAIL_WINDOW_SECONDS)
        for sent, latency in zip(sent_times, latencies, strict=True)
        if latency > p99
    }
    return len(slow), len(windows)


def steady_rate(
    sent_times: list[float], latencies: list[float], started: float, send_seconds: float
) -> float | None:
    """Token verdicts received per second in the send window after its first fifth (warm-up).

    What the worker kept up with: the offered rate when it kept pace, its own rate when it fell behind.
    Answered / time to the last verdict (`answered_per_s_to_last_verdict`) counts the last events'
    latency against the rate, so even a worker that keeps pace never reads the rate it was offered."""
    begin, end = started + send_seconds / 5, started + send_seconds
    if end <= begin:
        return None
    pairs = zip(sent_times, latencies, strict=True)
    received = sum(1 for sent, latency in pairs if begin <= sent + latency < end)
    return received / (end - begin)


def latency_by_second(sent_times: list[float], latencies: list[float], started: float) -> list[float | None]:
    """The median latency of the events sent in each second of the run: flat when the worker kept
    pace, rising when a backlog grew."""
    seconds: dict[int, list[float]] = {}
    for sent, latency in zip(sent_times, latencies, strict=True):
        seconds.setdefault(int(sent - started), []).append(latency)
    return [ms(percentile(seconds.get(second, []), 0.5)) for second in range(max(seconds, default=-1) + 1)]


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    """A phase's topics, once measured: a run writes gigabytes that nothing reads again."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        await admin.close()
    # A new partition takes a moment to get a working leader (longer on a busy broker); asking every
    # partition's end offset waits for that here, rather than in retried sends inside a measurement.
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        await probe.end_offsets(
            [TopicPartition(name, index) for name in names for index in range(partitions)]
        )
    finally:
        await probe.stop()


def new_producer(bootstrap: str, linger_ms: int = 1) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all", enable_idempotence=True
    )


def user_turn(conversation_id: str) -> bytes:
    event = {"conversation_id": conversation_id, "seq": 0, "role": "user", "token_ids": USER_TURN}
    return json.dumps(event | {"end_of_turn": True}).encode()


def assistant_token(conversation_id: str, seq: int, token: int, ts: float) -> bytes:
    """One assistant token event, formatted by hand: a fraction of json.dumps's cost, and the generator
    shares the worker's cores."""
    return (
        f'{{"conversation_id":"{conversation_id}","seq":{seq},"role":"assistant",'
        f'"token_ids":[{token}],"ts":{ts!r}}}'
    ).encode()


# --------------------------------------------------------------------------------------------------
# 1. Raw ceiling


async def raw_ceiling(bootstrap: str, events: int, partitions: int, repeats: int) -> dict:
    """Events/s of getmany -> json parse -> produce -> await acks -> commit, no model, no Redis.

    Passes alternate send, batch, batch, send, ... (`repeats` each), so that neither variant always
    runs first on a machine whose load drifts; each variant's figure is the mean of its passes.
    """
    source = f"bench.raw.{uuid.uuid4().hex[:8]}"
    order = [("send", "batch")[(index + index // 2) % 2] for index in range(2 * repeats)]
    sinks = [f"{source}.out-{number}-{variant}" for number, variant in enumerate(order)]
    await create_topics(bootstrap, [source, *sinks], partitions)
    producer = new_producer(bootstrap, linger_ms=5)
    await producer.start()
    try:
        publisher = BatchPublisher(producer)
        for first in range(0, events, 10_000):
            records = []
            for index in range(first, min(events, first + 10_000)):
                key = f"c{index % 500}"
                value = {
                    "conversation_id": key,
                    "seq": index,
                    "role": "assistant",
                    "token_ids": [index % 1000],
                }
                records.append((key.encode(), json.dumps(value | {"ts": time.time()}).encode()))
            await publisher.publish(source, records)
        passes: dict[str, list[float]] = {"send": [], "batch": []}
        for variant, sink in zip(order, sinks, strict=True):
            batched = publisher if variant == "batch" else None
            passes[variant].append(round(await raw_loop(bootstrap, producer, source, sink, events, batched)))
        return {
            "events": events,
            "order": order,
            "send_events_per_s": round(sum(passes["send"]) / repeats),
            "batch_publisher_events_per_s": round(sum(passes["batch"]) / repeats),
            "send_passes": passes["send"],
            "batch_publisher_passes": passes["batch"],
        }
    finally:
        await producer.stop()
        await delete_topics(bootstrap, [source, *sinks])


async def raw_loop(
    bootstrap: str,
    producer: AIOKafkaProducer,
    source: str,
    sink: str,
    events: int,
    publisher: BatchPublisher | None = None,
) -> float:
    """One consume -> produce pass over `source` in a fresh group; `publisher` None: one send a record."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        done, started, deadline = 0, None, time.monotonic() + 120 + events / 1000
        while done < events:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw loop: {done} of {events} events consumed before the deadline")
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batch:
                continue
            started = started or time.perf_counter()  # from the first records (not the group join)
            if publisher is None:
                sends = []
                for records in batch.values():
                    for record in records:
                        event = json.loads(record.value)
                        value = json.dumps({"seq": event["seq"]}).encode()
                        sends.append(await producer.send(sink, value, key=record.key))
                await asyncio.gather(*sends)
            else:
                out = []
                for records in batch.values():
                    for record in records:
                        event = json.loads(record.value)
                        out.append((record.key, json.dumps({"seq": event["seq"]}).encode()))
                await publisher.publish(sink, out)
            await consumer.commit()
            done += sum(len(records) for records in batch.values())
        return events / (time.perf_counter() - started)
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Tally:
    """What came back for one phase's assistant tokens (keyed by (conversation_id, seq))."""

    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)  # unanswered: their event ts
    opened: set[str] = field(default_factory=set)  # conversations whose user turn was answered
    answered: int = 0
    duplicates: int = 0
    errors: int = 0
    first_at: float | None = None  # time.time() of the first / last assistant-token verdict received
    first_count: int = 0  # assistant-token verdicts received together with the first one
    last_at: float | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, event ts -> verdict received here
    sent_times: list[float] = field(default_factory=list)  # each answered event's ts, as latencies
    worker_latencies: list[float] = field(default_factory=list)  # the verdicts' latency_ms / 1000


class Acknowledgements:
    """The generator's produce acknowledgements still outstanding. Futures are dropped as they
    complete: keeping every batch's future to the end would leave thousands of objects for each
    young garbage collection to walk, pausing the generator."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future] = set()
        self._failure: BaseException | None = None

    def track(self, futures: list[asyncio.Future]) -> None:
        for future in futures:
            self._pending.add(future)
            future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self._pending.discard(future)
        if self._failure is None and not future.cancelled():
            self._failure = future.exception()

    async def wait(self) -> None:
        """Until every send is acknowledged; raises the first failure."""
        await asyncio.gather(*self._pending)
        if self._failure is not None:
            raise self._failure


class VerdictReader:
    """Reads a verdict topic from its start in the background, tallying verdicts by conversation."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
        )
        self._tallies: dict[str, Tally] = {}
        self._task: asyncio.Task | None = None

    def route(self, conversations: list[str], tally: Tally) -> None:
        self._tallies.update(dict.fromkeys(conversations, tally))

    async def __aenter__(self) -> VerdictReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        tallies = self._tallies
        while True:
            # Small batches: parsing thousands of verdicts at once would stall the load generator.
            batch = await self._consumer.getmany(timeout_ms=50, max_records=500)
            now = time.time()
            for records in batch.values():
                for record in records:
                    verdict = from_json(record.value)  # Rust parser: cheaper than json.loads
                    conversation_id = verdict["conversation_id"]
                    tally = tallies.get(conversation_id)
                    if tally is None:
                        continue
                    if verdict["kind"] == "error":
                        tally.errors += 1
                    elif verdict["seq"] == 0:
                        tally.opened.add(conversation_id)
                    elif verdict["kind"] == "tokens" and verdict["role"] == "assistant":
                        sent = tally.sent_at.pop((conversation_id, verdict["seq"]), None)
                        if sent is None:
                            tally.duplicates += 1
                            continue
                        tally.answered += 1
                        tally.latencies.append(now - sent)
                        tally.sent_times.append(sent)
                        if verdict.get("latency_ms") is not None:
                            tally.worker_latencies.append(verdict["latency_ms"] / 1000)
                        if tally.first_at is None:
                            tally.first_at = now
                        if tally.first_at == now:
                            tally.first_count += 1
                        tally.last_at = now


async def wait_until(done: Callable[[], bool], timeout: float, worker: subprocess.Popen) -> bool:
    """True once `done()`; False after `timeout` seconds. Raises if the worker exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not done():
        if worker.poll() is not None:
            raise WorkerExited(f"the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# --------------------------------------------------------------------------------------------------
# Worker process


def kv_cache_bytes(args, conversations: int, tokens_each: list[int]) -> int | None:
    """--kv-cache-bytes, else on CPU a cache holding every conversation of a phase (tokens_each: per
    group of `conversations`), else None (a GPU worker takes a share of the free memory)."""
    if args.kv_cache_bytes:
        return args.kv_cache_bytes
    if not args.device.startswith("cpu"):
        return None
    try:
        config = GuardConfig.from_dict(json.loads((Path(args.model) / "config.json").read_text()))
    except (OSError, ValueError, KeyError):
        return MIN_CPU_KV_CACHE_BYTES
    # The element type the worker's engine will store, resolved as the engine resolves it.
    model_dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(torch.device("cpu"))
    _, element = resolve_attention_and_cache(
        args.attention_backend or "auto", args.kv_cache_dtype, torch.device("cpu"), model_dtype
    )
    per_token = bytes_per_token(config, element)
    blocks = sum(conversations * (math.ceil(tokens / BLOCK_SIZE) + 1) for tokens in tokens_each)
    return max(MIN_CPU_KV_CACHE_BYTES, int(1.25 * blocks * BLOCK_SIZE * per_token))


@contextlib.contextmanager
def worker_process(args, bootstrap: str, redis_url: str, prefix: str, cache_bytes: int | None) -> Iterator:
    port = free_port()
    environment = os.environ | {
        "GUARDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "GUARDSTREAM_REDIS_URL": redis_url,
        "GUARDSTREAM_MODEL": args.model,
        "GUARDSTREAM_DEVICE": args.device,
        "GUARDSTREAM_TEMPLATE": "raw",
        "GUARDSTREAM_TOKENS_TOPIC": f"{prefix}.tokens",
        "GUARDSTREAM_VERDICTS_TOPIC": f"{prefix}.verdicts",
        "GUARDSTREAM_DLQ_TOPIC": f"{prefix}.dlq",
        "GUARDSTREAM_GROUP_ID": f"{prefix}.workers",
        "GUARDSTREAM_REDIS_KEY_PREFIX": f"{prefix}:",
        "GUARDSTREAM_SESSION_TTL": "3600",  # the bench's sessions need not outlive it by a day
        "GUARDSTREAM_HTTP_PORT": str(port),
    }
    if args.dtype:
        environment["GUARDSTREAM_DTYPE"] = args.dtype
    if args.attention_backend:
        environment["GUARDSTREAM_ATTENTION_BACKEND"] = args.attention_backend
    environment["GUARDSTREAM_KV_CACHE_DTYPE"] = args.kv_cache_dtype
    if cache_bytes:
        environment["GUARDSTREAM_KV_CACHE_BYTES"] = str(cache_bytes)
    worker = subprocess.Popen(
        [sys.executable, "-m", "processor.cli", "worker", "--log-level", "WARNING"], cwd=ROOT, env=environment
    )
    worker.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


async def stage_totals(worker: subprocess.Popen) -> dict[str, tuple[float, float]]:
    """(seconds, count) per step stage and of step events, from the worker's /metrics."""
    url = worker.metrics_url  # type: ignore[attr-defined]
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("guardstream_step_stage_seconds_"):
                name = sample.labels["stage"]
            elif sample.name.startswith("guardstream_step_events_"):
                name = "events per step"
            elif sample.name.startswith("guardstream_event_age_seconds_"):
                name = "age"  # an event's, at decode: its mean is per event, not per step
            else:
                continue
            entry = totals.setdefault(name, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                entry[0] = sample.value
            elif sample.name.endswith("_count"):
                entry[1] = sample.value
    return {name: (total, count) for name, (total, count) in totals.items()}


def cpu_seconds(worker: subprocess.Popen) -> float | None:
    """The worker process's CPU time so far (user + system, all threads); None off Linux.

    CPU per event is steadier than events/s on a machine whose cores the broker, the generator and
    other jobs share: it says what the worker costs, not what it was left.
    """
    try:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine have been busy since boot (not idle, not waiting on I/O);
    None off Linux. Over a span, busy seconds / span = cores in use, by every process together."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, irq, softirq: not idle, iowait or steal (time the hypervisor kept)
    busy = sum(fields[index] for index in (0, 1, 2, 5, 6) if index < len(fields))
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_us_per_event(before: float | None, after: float | None, events: int) -> float | None:
    if before is None or after is None or not events:
        return None
    return round(1e6 * (after - before) / events, 1)


def stage_means(before: dict, after: dict) -> dict[str, float | None]:
    """Mean per step between two snapshots: stages in ms, 'events per step' as a count; 'age' (an
    event's when decoded) in ms, its mean per event."""
    means: dict[str, float | None] = {}
    for name, (total, count) in after.items():
        total_before, count_before = before.get(name, (0.0, 0.0))
        steps = count - count_before
        value = (total - total_before) / steps if steps else None
        means[name] = value if value is None or name == "events per step" else round(1000 * value, 2)
    return means


def phase_topics(prefix: str) -> list[str]:
    return [f"{prefix}.tokens", f"{prefix}.verdicts", f"{prefix}.dlq"]


# --------------------------------------------------------------------------------------------------
# 2. Offered load


async def offered_load(args, bootstrap: str, redis_url: str, rates: list[float]) -> list[dict]:
    prefix = f"bench.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, phase_topics(prefix), args.partitions)
    tokens_each = [3 + math.ceil(rate * args.seconds / args.conversations) for rate in rates]
    cache_bytes = kv_cache_bytes(args, args.conversations, tokens_each)
    producer = new_producer(bootstrap)
    await producer.start()
    results = []
    try:
        async with VerdictReader(bootstrap, f"{prefix}.verdicts") as reader:
            with worker_process(args, bootstrap, redis_url, prefix, cache_bytes) as worker:
                previous: tuple[dict, Tally] | None = None
                for index, rate in enumerate(rates):
                    if previous is not None:
                        row, tally = previous
                        if tally.sent_at:  # a backlog: give it time to clear, unmeasured
                            await wait_until(
                                lambda pending=tally.sent_at: not pending, args.answer_timeout, worker
                            )
                            row["left_when_next_rate_started"] = len(tally.sent_at)
                        await asyncio.sleep(args.pause)
                    timeout = args.warmup if index == 0 else args.answer_timeout
                    previous = await one_rate(args, rate, index, producer, reader, worker, prefix, timeout)
                    results.append(previous[0])
                    print(f"  {rate:,.0f}/s: {rate_summary(previous[0])}", flush=True)
    finally:
        await producer.stop()
        await delete_topics(bootstrap, phase_topics(prefix))
    for row in results:
        row["kv_cache_bytes"] = cache_bytes
    return results


async def one_rate(
    args,
    rate: float,
    index: int,
    producer: AIOKafkaProducer,
    reader: VerdictReader,
    worker: subprocess.Popen,
    prefix: str,
    open_timeout: float,
) -> tuple[dict, Tally]:
    """One offered rate; returns its row and its tally (still counting a backlog's verdicts)."""
    topic = f"{prefix}.tokens"
    publisher = BatchPublisher(producer)
    run = uuid.uuid4().hex[:6]
    conversations = [f"bench-r{index}-{run}-{number}" for number in range(args.conversations)]
    keys = [conversation_id.encode() for conversation_id in conversations]
    tally = Tally()
    reader.route(conversations, tally)
    await publisher.publish(topic, [(key, user_turn(c)) for key, c in zip(keys, conversations, strict=True)])
    opened = await wait_until(lambda: len(tally.opened) == len(conversations), open_timeout, worker)
    if not opened:
        raise RuntimeError(
            f"the worker answered {len(tally.opened)} of {len(conversations)} user turns in {open_timeout} s"
        )

    stages_before, cpu_before = await stage_totals(worker), cpu_seconds(worker)
    harness_before, machine_before, span_started = time.process_time(), machine_busy_seconds(), time.time()
    total, count = round(rate * args.seconds), len(conversations)
    sent_at, tick = tally.sent_at, args.tick_ms / 1000
    acks = Acknowledgements()
    sent, ticks, longest_gap = 0, 0, 0.0
    started_wall, started = time.time(), time.perf_counter()
    last_queued = started
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate))  # event i is due at (i + 1) / rate
        if due > sent:
            records = []
            for number in range(sent, due):
                slot, seq = number % count, 1 + number // count
                conversation_id = conversations[slot]
                due_at = started_wall + (number + 1) / rate  # the tick's wait counts in the latency
                sent_at[(conversation_id, seq)] = due_at
                token = assistant_token(conversation_id, seq, 1000 + number % 5000, due_at)
                records.append((keys[slot], token))
            acks.track(await publisher.send(topic, records))  # waits while a partition's last batch is unsent
            queued = time.perf_counter()
            longest_gap = max(longest_gap, queued - last_queued)
            sent, ticks, last_queued = due, ticks + 1, queued
        if sent < total:
            await asyncio.sleep(tick)
    send_seconds = last_queued - started
    await acks.wait()
    acked_seconds = time.perf_counter() - started
    await wait_until(lambda: tally.answered >= total, args.answer_timeout, worker)
    cpu_after = cpu_seconds(worker)
    harness_after = time.process_time()
    machine_after, span_seconds = machine_busy_seconds(), time.time() - span_started
    stages = stage_means(stages_before, await stage_totals(worker))
    elapsed = (tally.last_at - started_wall) if tally.last_at else None
    latencies = tally.latencies
    slow_windows, windows = tail_windows(tally.sent_times, latencies)
    steady = steady_rate(tally.sent_times, latencies, started_wall, send_seconds)
    row = {
        "target_events_per_s": rate,
        "offered_events_per_s": round(total / send_seconds) if send_seconds > 0 else None,
        "sustained_events_per_s": round(steady) if steady is not None else 0,
        "answered_per_s_to_last_verdict": round(tally.answered / elapsed) if elapsed else 0,
        "events_sent": total,
        "conversations": count,
        "send_seconds": round(send_seconds, 3),
        "acked_seconds": round(acked_seconds, 3),
        "ticks": ticks,
        "longest_gap_between_sends_ms": ms(longest_gap),  # the generator's burstiness
        "token_verdicts_received": tally.answered,
        "unanswered": total - tally.answered,
        "duplicate_verdicts": tally.duplicates,
        "error_verdicts": tally.errors,
        "seconds_to_last_verdict": round(elapsed, 3) if elapsed else None,
        "latency_p50_ms": ms(percentile(latencies, 0.5)),
        "latency_p95_ms": ms(percentile(latencies, 0.95)),
        "latency_p99_ms": ms(percentile(latencies, 0.99)),
        "latency_max_ms": ms(max(latencies, default=None)),
        # How the slowest 1% spreads over the run: in how many of its 100 ms windows (by event ts).
        "windows_with_latency_above_p99": slow_windows,
        "windows": windows,
        "latency_p50_ms_by_second": latency_by_second(tally.sent_times, latencies, started_wall),
        "worker_latency_p50_ms": ms(percentile(tally.worker_latencies, 0.5)),
        "worker_latency_p99_ms": ms(percentile(tally.worker_latencies, 0.99)),
        "worker_step_stage_mean_ms": stages,  # from the worker's /metrics over this rate
        # The worker's CPU (all threads) over this rate, per answered token event.
        "worker_cpu_us_per_event": cpu_us_per_event(cpu_before, cpu_after, tally.answered),
        # This process (generator and verdict reader) over the same span: what the harness takes from
        # the cores the worker shares.
        "harness_cpu_us_per_event": cpu_us_per_event(harness_before, harness_after, tally.answered),
        # Every process of the machine (worker, harness, broker, Redis, the rest) over the same span.
        "machine_cpu_us_per_event": cpu_us_per_event(machine_before, machine_after, tally.answered),
        "machine_cores_busy": (
            None
            if machine_before is None or machine_after is None
            else round((machine_after - machine_before) / span_seconds, 2)
        ),
    }
    return row, tally


# --------------------------------------------------------------------------------------------------
# 3. Drain


async def drain(args, bootstrap: str, redis_url: str) -> dict:
    """The worker's maximum throughput: token verdicts/s while it works off a backlog of token events.

    A fresh worker first answers every conversation's user turn (so that the backlog holds tokens
    only, as in a stream, and nothing of the start-up is timed). It is then frozen (SIGSTOP) while
    the token events are produced and thawed: it finds them all in its topic, as if it had started
    after they were produced, with its conversations cached as in steady state.
    """
    events = args.drain_events
    count = min(events, args.drain_conversations or args.conversations)
    prefix = f"bench.{uuid.uuid4().hex[:8]}.drain"
    tokens_topic = f"{prefix}.tokens"
    await create_topics(bootstrap, phase_topics(prefix), args.partitions)
    run = uuid.uuid4().hex[:6]
    conversations = [f"bench-d-{run}-{number}" for number in range(count)]
    keys = [conversation_id.encode() for conversation_id in conversations]
    cache_bytes = kv_cache_bytes(args, count, [len(USER_TURN) + math.ceil(events / count)])
    tally = Tally()
    producer = new_producer(bootstrap)
    await producer.start()
    try:
        publisher = BatchPublisher(producer)
        async with VerdictReader(bootstrap, f"{prefix}.verdicts") as reader:
            reader.route(conversations, tally)
            for first in range(0, count, 10_000):
                chunk = range(first, min(count, first + 10_000))
                await publisher.publish(tokens_topic, [(keys[i], user_turn(conversations[i])) for i in chunk])
            started = time.time()
            with worker_process(args, bootstrap, redis_url, prefix, cache_bytes) as worker:
                timeout = args.warmup + args.drain_timeout
                if not await wait_until(lambda: len(tally.opened) == count, timeout, worker):
                    raise RuntimeError(
                        f"drain: {len(tally.opened)} of {count} user turns answered in {timeout} s"
                    )
                opened_seconds = time.time() - started
                worker.send_signal(signal.SIGSTOP)
                frozen, cpu_before = time.perf_counter(), cpu_seconds(worker)
                try:
                    for first in range(0, events, 10_000):
                        now, records = time.time(), []
                        for number in range(first, min(events, first + 10_000)):
                            slot, seq = number % count, 1 + number // count
                            tally.sent_at[(conversations[slot], seq)] = now
                            token = assistant_token(conversations[slot], seq, 1000 + number % 5000, now)
                            records.append((keys[slot], token))
                        await publisher.publish(tokens_topic, records)
                finally:
                    worker.send_signal(signal.SIGCONT)
                frozen_seconds, thawed = time.perf_counter() - frozen, time.time()
                await wait_until(lambda: tally.answered >= events, args.drain_timeout, worker)
                cpu_after = cpu_seconds(worker)
    finally:
        await producer.stop()
        await delete_topics(bootstrap, phase_topics(prefix))
    span = (tally.last_at - tally.first_at) if tally.first_at else 0.0
    # The verdicts received with the first one were computed before it arrived: not in the span.
    measured = tally.answered - tally.first_count
    return {
        "events": events,
        "conversations": count,
        "token_verdicts_received": tally.answered,
        "unanswered": events - tally.answered,
        "duplicate_verdicts": tally.duplicates,
        "error_verdicts": tally.errors,
        "seconds_first_to_last_verdict": round(span, 3),
        "verdicts_in_first_receipt": tally.first_count,
        "events_per_s": round(measured / span) if span > 0 else None,
        "seconds_to_answer_user_turns": round(opened_seconds, 3),  # worker start included
        "seconds_frozen_while_producing": round(frozen_seconds, 3),
        "seconds_thaw_to_first_verdict": round(tally.first_at - thawed, 3) if tally.first_at else None,
        "kv_cache_bytes": cache_bytes,
        "worker_cpu_us_per_event": cpu_us_per_event(cpu_before, cpu_after, tally.answered),
    }


# --------------------------------------------------------------------------------------------------
# Output


def answered_text(row: dict) -> str:
    if not row["unanswered"]:
        return f"all {row['events_sent']:,}"
    return f"backlog {row['unanswered']:,} of {row['events_sent']:,}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def rate_summary(row: dict) -> str:
    latencies = " / ".join(number(row[f"latency_{name}_ms"]) for name in ("p50", "p95", "p99"))
    return (
        f"offered {number(row['offered_events_per_s'])}/s, sustained {row['sustained_events_per_s']:,}/s, "
        f"{answered_text(row)}, p50/p95/p99 {latencies} ms "
        f"(above p99 in {row['windows_with_latency_above_p99']} of {row['windows']} windows of 100 ms); "
        f"answered / time to the last verdict {row['answered_per_s_to_last_verdict']:,}/s"
    )


def print_table(args, result: dict) -> None:
    print(
        f"\npipeline benchmark: device={args.device} model={args.model} partitions={args.partitions} "
        f"cpus={result['cpu_count']}"
    )
    raw = result["raw_ceiling"]
    if raw:
        print(
            f"\nraw ceiling, {raw['events']:,} events: getmany -> json parse -> produce -> await acks -> "
            "commit (no model, no Redis)"
        )
        print(f"{'variant':34} {'events/s':>10}  passes")
        for label, name in (("producer.send per record", "send"), ("BatchPublisher", "batch_publisher")):
            passes = ", ".join(f"{value:,}" for value in raw[f"{name}_passes"])
            print(f"{label:34} {raw[f'{name}_events_per_s']:>10,}  {passes}")
    if result["rates"]:
        print(
            f"\noffered load, one worker: {args.conversations} conversations, one token per event, "
            f"{args.seconds:g} s per rate; latency = event ts -> verdict received (answered events)"
        )
        print(
            f"{'target/s':>9} {'offered/s':>10} {'sustained/s':>12}  {'answered':<26}"
            f"{'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'worker CPU us/event':>20}"
            f" {'harness CPU us/event':>21} {'machine CPU us/event':>21} {'cores busy':>11}"
        )
        for row in result["rates"]:
            cells = [number(row[f"latency_{name}_ms"]) for name in ("p50", "p95", "p99")]
            print(
                f"{row['target_events_per_s']:>9,.0f} {number(row['offered_events_per_s']):>10} "
                f"{row['sustained_events_per_s']:>12,}  {answered_text(row):<26}"
                f"{cells[0]:>9} {cells[1]:>9} {cells[2]:>9} {number(row['worker_cpu_us_per_event']):>20}"
                f" {number(row.get('harness_cpu_us_per_event')):>21}"
                f" {number(row.get('machine_cpu_us_per_event')):>21}"
                f" {row.get('machine_cores_busy') or '-':>11}"
            )
        stage_names = ("events per step", "age", *STAGES)
        print(
            "\nworker's mean per step (ms; from its /metrics): an event's age when decoded (its mean), "
            + ", ".join(stage_names[2:])
        )
        print(f"{'target/s':>9} " + " ".join(f"{name.split()[0]:>9}" for name in stage_names))
        for row in result["rates"]:
            means = row["worker_step_stage_mean_ms"]
            print(
                f"{row['target_events_per_s']:>9,.0f} "
                + " ".join(f"{number(means.get(n)):>9}" for n in stage_names)
            )
        print("\np50 latency (ms) of the events sent in each second of the rate")
        for row in result["rates"]:
            by_second = " ".join(number(value) for value in row["latency_p50_ms_by_second"])
            print(f"{row['target_events_per_s']:>9,.0f}  {by_second}")
        for row in result["rates"]:
            if row.get("left_when_next_rate_started"):
                print(
                    f"note: {row['left_when_next_rate_started']:,} events of rate "
                    f"{row['target_events_per_s']:,.0f}/s were still unanswered when the next rate started"
                )
            if row["error_verdicts"] or row["duplicate_verdicts"]:
                print(
                    f"note: rate {row['target_events_per_s']:,.0f}/s: {row['error_verdicts']} error "
                    f"verdicts, {row['duplicate_verdicts']} duplicates"
                )
    drained = result["drain"]
    if drained:
        print(
            f"\ndrain: {drained['events']:,} token events (one token each) over {drained['conversations']:,} "
            "conversations, all waiting in the topic when the worker (done with their user turns) resumes"
        )
        answered = (
            f"all {drained['events']:,}"
            if not drained["unanswered"]
            else f"{drained['token_verdicts_received']:,} of {drained['events']:,}"
        )
        print(
            f"verdicts/s, first to last token verdict: {number(drained['events_per_s'])} "
            f"({answered} answered, {drained['seconds_first_to_last_verdict']:.2f} s); "
            f"worker CPU {number(drained['worker_cpu_us_per_event'])} us per event"
        )


def run_facts() -> dict:
    """Where a benchmark ran: the machine's cores, platform, Python and the code's revision."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git_revision(),
    }


def rows_result(args: argparse.Namespace, started: float, rows: list[dict]) -> dict:
    """A table benchmark's JSON (step.py, kernel.py): when, how long, its arguments, where, its rows."""
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        **run_facts(),
        "rows": rows,
    }


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def git_revision() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


async def main_async(args, rates: list[float]) -> dict:
    with contextlib.ExitStack() as stack:
        bootstrap, redis_url = args.kafka_bootstrap, args.redis_url
        if not bootstrap or not redis_url:
            from processor.local.testing import kafka_endpoint, redis_endpoint

            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-services-")))
            bootstrap = bootstrap or kafka_endpoint(stack, state)
            redis_url = redis_url or redis_endpoint(stack, state)
        # As in the worker: a full collection walking the libraries' objects pauses this process,
        # which delays sends and reads and counts as latency.
        stack.enter_context(long_lived_heap_frozen())
        raw = None
        if args.raw_events:
            print(f"raw ceiling: {args.raw_events:,} events ...", flush=True)
            raw = await raw_ceiling(bootstrap, args.raw_events, args.partitions, args.raw_repeats)
            print(
                f"  send per record {raw['send_events_per_s']:,}/s, "
                f"BatchPublisher {raw['batch_publisher_events_per_s']:,}/s",
                flush=True,
            )
        loads = []
        if rates:
            print(f"offered load: rates {', '.join(f'{rate:,.0f}' for rate in rates)} ...", flush=True)
            loads = await offered_load(args, bootstrap, redis_url, rates)
        drained = None
        if args.drain_events:
            print(f"drain: {args.drain_events:,} events ...", flush=True)
            drained = await drain(args, bootstrap, redis_url)
    return {"raw_ceiling": raw, "rates": loads, "drain": drained}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (guardstream make-test-model DIR)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=get_args(KvCacheDtype),
        help="the worker's --kv-cache-dtype (auto: the model's dtype)",
    )
    parser.add_argument("--kafka-bootstrap")
    parser.add_argument("--redis-url")
    parser.add_argument("--conversations", type=int, default=200, help="conversations per offered rate")
    parser.add_argument(
        "--rates",
        default=None,
        help=f"offered token events/s, comma separated (default {DEFAULT_RATES}; '' skips)",
    )
    parser.add_argument("--rate", type=float, default=None, help="one offered rate (same as --rates RATE)")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of offered load per rate")
    parser.add_argument(
        "--tick-ms",
        type=float,
        default=5,
        help="the generator sends what is due this often (Kafka 4's default producer linger.ms)",
    )
    parser.add_argument(
        "--answer-timeout",
        type=float,
        default=60,
        help="seconds after a rate's last event to wait for its verdicts (and again for a backlog to clear)",
    )
    parser.add_argument("--pause", type=float, default=1, help="seconds between rates once answered")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--raw-events", type=int, default=100_000, help="0 skips the raw ceiling")
    parser.add_argument("--raw-repeats", type=int, default=2, help="raw passes per variant, alternating")
    parser.add_argument("--drain-events", type=int, default=40_000, help="0 skips the drain")
    parser.add_argument(
        "--drain-conversations",
        type=int,
        default=0,
        help="conversations the drain's events go round (default: --conversations)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=180, help="seconds for the drain, after --warmup"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=60,
        help="seconds a fresh worker gets to load, join and answer its first user turns",
    )
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument(
        "--attention-backend", default=None, help="the worker's --attention-backend (default: its own, auto)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/pipeline-<device>.json")
    args = parser.parse_args()
    if args.rate is not None and args.rates is not None:
        parser.error("give --rate or --rates, not both")
    text = str(args.rate) if args.rate is not None else (DEFAULT_RATES if args.rates is None else args.rates)
    rates = [float(value) for value in text.split(",") if value.strip() and float(value) > 0]

    out = args.out or ROOT / "bench" / "results" / f"pipeline-{args.device.split(':')[0]}.json"
    started = datetime.datetime.now(datetime.UTC)
    measured = asyncio.run(main_async(args, rates))
    result = {
        "timestamp": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        "args": vars(args) | {"out": str(out), "redis_url": args.redis_url and redact_url(args.redis_url)},
        "target_rates": rates,
        **run_facts(),
    }
    result |= measured
    print_table(args, result)
    write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
