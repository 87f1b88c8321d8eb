"""Gateway benchmark: the hold-back delay of `guardstream gateway --release hold` at several stream counts.

One real `guardstream worker` process and one real `guardstream gateway` process (--gateways N: N of
them, the streams alternating between them), on a real local broker and Redis, between a stand-in
upstream and streaming clients (aiohttp, reading the SSE lines), both in this process. Each of
--streams concurrent streams asks for one chat completion after another for --seconds (starts spread
over the first --stagger seconds); the stand-in answers each with --reply-tokens words, one word a
delta, at --tokens-per-s, on a fixed schedule (a late delta does not push the next ones back).
Every request is a new conversation, as every gateway request is. Per stream count:

- **gateway hold-back**: the gateway's own `guardstream_gateway_hold_back_seconds` histogram (per
  released token, from the moment its text arrived from the upstream and tokenized to its release),
  read from its /metrics before and after; p50/p99 interpolated within the histogram's buckets, as
  Prometheus's `histogram_quantile` does, and the exact share released within 100 ms (a bucket bound).
- **delta delay**: client-side and exact, per upstream delta: from the stand-in's send to the first
  client chunk whose text covers the delta's end. It adds to the hold-back the two local hops and the
  gateway's incremental tokenizer, which keeps a delta's last token until the next delta (or the end)
  shows it cannot merge.
- **time to first token**: from the request's start to the first content chunk (the prompt's verdict,
  the upstream's first delta, its verdicts).
- the worker's step stages and the age of an event when decoded, from the worker's /metrics; the CPU
  of the worker, the gateway, this process and the machine, and the busiest processes, from /proc.

An unmeasured first load (--warm-seconds) lets a fresh broker's JVM compile its hot paths first.

    python bench/gateway.py --streams 1,50,200 --seconds 20   # bench/results/gateway-cpu.json

Without --model it writes the tiny random test model with its reply risk head zeroed, so that every
reply token is Safe and every stream runs its whole length (see safe_replies_test_model); with --model
the checkpoint's own verdicts decide, and cut replies and blocked prompts are counted.
Without --kafka-bootstrap / --redis-url it starts local services (processor.local) and stops them after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pipeline import (
    ROOT,
    cpu_seconds,
    machine_busy_seconds,
    ms,
    percentile,
    run_facts,
    stage_means,
    stage_totals,
    write_result,
)
from prometheus_client.parser import text_string_to_metric_families

from processor.heap import long_lived_heap_frozen
from processor.local.process import free_port

HOLD_BACK = "guardstream_gateway_hold_back_seconds"
PROMPT = "Tell me a story."  # Safe under the tiny test model of seed 0, so its replies are streamed
WORDS = "the a dragon bridge river song riddle bread flour water storm castle night quiet green ship map gold"


# --------------------------------------------------------------------------------------------------
# The stand-in upstream: one word a delta on a fixed schedule, each delta's send time recorded


@dataclass
class SentReply:
    ends: list[int] = field(default_factory=list)  # per delta: the reply's length in characters after it
    sent: list[float] = field(default_factory=list)  # per delta: when it was written (monotonic)


class PacedUpstream:
    def __init__(self, tokens_per_s: float, reply_tokens: int) -> None:
        self.interval = 1 / tokens_per_s
        self.reply_tokens = reply_tokens
        self.replies: dict[str, SentReply] = {}  # by the request's `model`: the bench's request key

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = body["model"]
        rng = random.Random(key)
        words = WORDS.split()
        deltas = [
            rng.choice(words) if index == 0 else " " + rng.choice(words) for index in range(self.reply_tokens)
        ]
        reply = self.replies.setdefault(key, SentReply())
        sse = EventSourceResponse(allow_all_methods=True)  # the route is a POST
        await sse.prepare(request)
        loop = asyncio.get_running_loop()
        start, length = loop.time(), 0
        for index, delta in enumerate(deltas):
            await asyncio.sleep(max(0.0, start + index * self.interval - loop.time()))
            length += len(delta)
            reply.ends.append(length)
            reply.sent.append(time.monotonic())
            await sse.send(json.dumps(chunk(key, {"content": delta}, None)))
        await sse.send(json.dumps(chunk(key, {}, "stop")))
        await sse.send("[DONE]")
        sse.stop_streaming()
        return sse


def chunk(model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


@contextlib.asynccontextmanager
async def running_upstream(upstream: PacedUpstream):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.chat_completions)
    # handler_cancellation: the gateway cancelling a cut reply stops its stream here too.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------------
# The worker and the gateway, each a process of its own


def guardstream_process(
    arguments: list[str], environment: dict[str, str], http_port: int
) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "processor.cli", *arguments, "--log-level", "WARNING"],
        cwd=ROOT,
        env=os.environ | environment,
    )
    process.metrics_url = f"http://127.0.0.1:{http_port}/metrics"  # type: ignore[attr-defined]
    process.ready_url = f"http://127.0.0.1:{http_port}/readyz"  # type: ignore[attr-defined]
    return process


@contextlib.contextmanager
def stopped_after(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_ready(process: subprocess.Popen, name: str, timeout: float) -> None:
    url = process.ready_url  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the {name} exited with {process.returncode} before it was ready")
        try:
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {name} was not ready within {timeout:.0f} s ({url})") from None
            await asyncio.sleep(0.5)


async def hold_back_buckets(gateways: list[subprocess.Popen]) -> dict[float, float]:
    """The hold-back histogram's cumulative counts by upper bound, summed over the gateways' /metrics."""
    buckets: dict[float, float] = {}
    for gateway in gateways:
        url = gateway.metrics_url  # type: ignore[attr-defined]
        response = await asyncio.to_thread(urllib.request.urlopen, url, timeout=10)
        text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == HOLD_BACK + "_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile(
    before: dict[float, float], after: dict[float, float], fraction: float
) -> float | None:
    """Prometheus's histogram_quantile over the counts added between two snapshots: linear within the
    bucket the quantile falls in; the largest finite bound when it falls in +Inf."""
    bounds = sorted(after)
    counts = [after[bound] - before.get(bound, 0.0) for bound in bounds]
    total = counts[-1] if counts else 0.0
    if not total:
        return None
    rank, lower, below = fraction * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def share_within(before: dict[float, float], after: dict[float, float], bound: float) -> float | None:
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if not total:
        return None
    return (after[bound] - before.get(bound, 0.0)) / total


def process_cpu_seconds() -> dict[tuple[int, str], float]:
    """Every process's CPU seconds so far, by (pid, command name), from /proc; empty off Linux."""
    seconds = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rpartition(")")[2].split()
        seconds[(int(stat.parent.name), name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def busiest(before: dict, after: dict, wall: float, count: int = 8) -> list[dict]:
    """The processes that used the most CPU between two snapshots, in cores: what shared the machine
    (the broker, Redis, anything else running) besides the worker, the gateway and this process."""
    used = sorted(((after[key] - before.get(key, 0.0), key) for key in after), reverse=True)[:count]
    return [{"pid": pid, "name": name, "cores": round(cpu / wall, 2)} for cpu, (pid, name) in used if cpu > 0]


# --------------------------------------------------------------------------------------------------
# The callers


@dataclass
class Tally:
    finish_reasons: dict[str, int] = field(default_factory=dict)
    first_token_s: list[float] = field(default_factory=list)
    delta_delays_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    released_chars: int = 0


async def one_request(
    client: aiohttp.ClientSession, url: str, upstream: PacedUpstream, key: str, tally: Tally
) -> bool:
    """One streamed chat completion, tallied; False when it failed."""
    started = time.monotonic()
    received: list[tuple[float, int]] = []  # (when, the released text's length after the chunk)
    length, finish_reason = 0, None
    body = {"model": key, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    try:
        async with client.post(url, json=body) as response:
            if response.status != 200:
                tally.errors.append(f"HTTP {response.status}: {(await response.text())[:200]}")
                return False
            async for line in response.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.monotonic()
                part = json.loads(line[5:])
                if "error" in part:
                    tally.errors.append(f"stream error: {part['error']}")
                    return False
                if not part.get("choices"):
                    continue
                choice = part["choices"][0]
                content = choice["delta"].get("content")
                if content:
                    length += len(content)
                    received.append((now, length))
                finish_reason = choice.get("finish_reason") or finish_reason
    except (aiohttp.ClientError, TimeoutError) as error:
        tally.errors.append(f"{type(error).__name__}: {error}")
        return False
    tally.finish_reasons[str(finish_reason)] = tally.finish_reasons.get(str(finish_reason), 0) + 1
    tally.released_chars += length
    if received:
        tally.first_token_s.append(received[0][0] - started)
    sent = upstream.replies.pop(key, SentReply())
    position = 0
    for end, sent_at in zip(sent.ends, sent.sent, strict=True):
        while position < len(received) and received[position][1] < end:
            position += 1
        if position == len(received):
            break  # the rest was cut
        tally.delta_delays_s.append(received[position][0] - sent_at)
    return True


async def one_stream(
    client: aiohttp.ClientSession,
    url: str,
    upstream: PacedUpstream,
    name: str,
    delay: float,
    until: float,
    tally: Tally,
) -> None:
    await asyncio.sleep(delay)
    number = 0
    while time.monotonic() < until:
        if not await one_request(client, url, upstream, f"{name}-{number}", tally):
            await asyncio.sleep(1)  # a failing gateway is not hammered; the errors are counted
        number += 1


# --------------------------------------------------------------------------------------------------
# One stream count


def total_cpu_seconds(processes: list[subprocess.Popen]) -> float | None:
    seconds = [cpu_seconds(process) for process in processes]
    return None if None in seconds else sum(seconds)


async def one_level(args, streams: int, client, urls, upstream, worker, gateways) -> dict:
    tally = Tally()
    run = uuid.uuid4().hex[:6]
    stages_before = await stage_totals(worker)
    buckets_before = await hold_back_buckets(gateways)
    measured = {"worker": [worker], "gateway": gateways}
    cpu_before = {name: total_cpu_seconds(processes) for name, processes in measured.items()}
    own_before, busy_before, wall_before = time.process_time(), machine_busy_seconds(), time.monotonic()
    processes_before = process_cpu_seconds()
    until = time.monotonic() + args.seconds
    stagger = min(args.stagger, args.seconds)
    await asyncio.gather(
        *(
            one_stream(
                client,
                urls[index % len(urls)],  # streams spread over the gateways, as a load balancer would
                upstream,
                f"bench-{run}-{streams}-{index}",
                stagger * index / streams,
                until,
                tally,
            )
            for index in range(streams)
        )
    )
    wall = time.monotonic() - wall_before
    busy_after = machine_busy_seconds()
    processes = busiest(processes_before, process_cpu_seconds(), wall)
    buckets_after = await hold_back_buckets(gateways)
    stages_after = await stage_totals(worker)
    cpu = {
        name: None
        if cpu_before[name] is None or after is None
        else round((after - cpu_before[name]) / wall, 2)
        for name, processes in measured.items()
        for after in [total_cpu_seconds(processes)]
    }
    cpu["bench"] = round((time.process_time() - own_before) / wall, 2)
    cpu["machine"] = (
        None if busy_before is None or busy_after is None else round((busy_after - busy_before) / wall, 2)
    )
    released_tokens = buckets_after.get(float("inf"), 0.0) - buckets_before.get(float("inf"), 0.0)
    cpu_per_token = {
        name: None if cores is None or not released_tokens else round(1e6 * cores * wall / released_tokens, 1)
        for name, cores in cpu.items()
    }
    return {
        "streams": streams,
        "gateways": len(gateways),
        "seconds": round(wall, 1),
        "requests": sum(tally.finish_reasons.values()) + len(tally.errors),
        "finish_reasons": tally.finish_reasons,
        "errors": len(tally.errors),
        "error_examples": tally.errors[:3],
        "released_tokens": int(released_tokens),
        "released_tokens_per_s": round(released_tokens / wall, 1),
        "hold_back_p50_ms": ms(histogram_quantile(buckets_before, buckets_after, 0.5)),
        "hold_back_p99_ms": ms(histogram_quantile(buckets_before, buckets_after, 0.99)),
        "hold_back_share_within_100_ms": share_within(buckets_before, buckets_after, 0.1),
        "hold_back_buckets": {
            str(bound): buckets_after[bound] - buckets_before.get(bound, 0.0)
            for bound in sorted(buckets_after)
        },
        "delta_delay_p50_ms": ms(percentile(tally.delta_delays_s, 0.5)),
        "delta_delay_p99_ms": ms(percentile(tally.delta_delays_s, 0.99)),
        "delta_delays": len(tally.delta_delays_s),
        "first_token_p50_ms": ms(percentile(tally.first_token_s, 0.5)),
        "first_token_p99_ms": ms(percentile(tally.first_token_s, 0.99)),
        "cores_busy": cpu,
        "cpu_us_per_released_token": cpu_per_token,
        "busiest_processes": processes,
        "worker_step_stage_mean_ms": stage_means(stages_before, stages_after),
    }


async def main_async(args, levels: list[int], model: str) -> list[dict]:
    async with contextlib.AsyncExitStack() as stack:
        bootstrap, redis_url = args.kafka_bootstrap, args.redis_url
        if not bootstrap or not redis_url:
            from processor.local.testing import kafka_endpoint, redis_endpoint

            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-services-")))
            bootstrap = bootstrap or kafka_endpoint(stack, state)
            redis_url = redis_url or redis_endpoint(stack, state)
        prefix = f"bench-gateway-{uuid.uuid4().hex[:8]}"
        topics = {"tokens_topic": f"{prefix}.tokens", "verdicts_topic": f"{prefix}.verdicts"}
        worker_port = free_port()
        worker = stack.enter_context(
            stopped_after(
                guardstream_process(
                    ["worker"],
                    {
                        "GUARDSTREAM_KAFKA_BOOTSTRAP": bootstrap,
                        "GUARDSTREAM_REDIS_URL": redis_url,
                        "GUARDSTREAM_MODEL": model,
                        "GUARDSTREAM_DEVICE": "cpu",
                        "GUARDSTREAM_TOKENS_TOPIC": topics["tokens_topic"],
                        "GUARDSTREAM_VERDICTS_TOPIC": topics["verdicts_topic"],
                        "GUARDSTREAM_DLQ_TOPIC": f"{prefix}.dlq",
                        "GUARDSTREAM_GROUP_ID": f"{prefix}.workers",
                        "GUARDSTREAM_REDIS_KEY_PREFIX": f"{prefix}:",
                        "GUARDSTREAM_SESSION_TTL": "3600",
                        "GUARDSTREAM_ENDED_SESSION_TTL": "60",
                        "GUARDSTREAM_HTTP_PORT": str(worker_port),
                    },
                    worker_port,
                )
            )
        )
        await wait_ready(worker, "worker", args.warmup)
        upstream = PacedUpstream(args.tokens_per_s, args.reply_tokens)
        upstream_url = await stack.enter_async_context(running_upstream(upstream))
        gateway_ports = [free_port() for _ in range(args.gateways)]
        gateways = [
            stack.enter_context(
                stopped_after(
                    guardstream_process(
                        ["gateway"],
                        {
                            "GUARDSTREAM_GATEWAY_MODEL": model,
                            "GUARDSTREAM_GATEWAY_UPSTREAM": upstream_url,
                            "GUARDSTREAM_GATEWAY_KAFKA_BOOTSTRAP": bootstrap,
                            "GUARDSTREAM_GATEWAY_TOKENS_TOPIC": topics["tokens_topic"],
                            "GUARDSTREAM_GATEWAY_VERDICTS_TOPIC": topics["verdicts_topic"],
                            "GUARDSTREAM_GATEWAY_LISTEN": f"127.0.0.1:{port}",
                            "GUARDSTREAM_GATEWAY_RELEASE": "hold",
                        },
                        port,
                    )
                )
            )
            for port in gateway_ports
        ]
        for gateway in gateways:
            await wait_ready(gateway, "gateway", args.warmup)
        # Plain aiohttp reading the SSE lines: the openai client's per-chunk model objects cost the
        # shared cores more than the gateway does (tests/gateway checks the wire with openai itself).
        client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=0)
        )
        urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in gateway_ports]
        rows = []
        try:
            if args.warm_seconds:
                # A fresh broker's JVM compiles its hot paths under its first load; not measured.
                print(
                    f"warming up: {args.warm_streams} streams for {args.warm_seconds:.0f} s ...", flush=True
                )
                warm = argparse.Namespace(**{**vars(args), "seconds": args.warm_seconds})
                await one_level(warm, args.warm_streams, client, urls, upstream, worker, gateways)
                await asyncio.sleep(args.pause)
            for streams in levels:
                print(f"{streams} streams for {args.seconds:.0f} s ...", flush=True)
                rows.append(await one_level(args, streams, client, urls, upstream, worker, gateways))
                print_row(rows[-1])
                await asyncio.sleep(args.pause)
        finally:
            await client.close()
        return rows


# --------------------------------------------------------------------------------------------------
# Output


def number(value) -> str:
    return "-" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def print_row(row: dict) -> None:
    stages = row["worker_step_stage_mean_ms"]
    print(
        f"  {row['requests']} requests {row['finish_reasons']}, {row['errors']} errors; "
        f"cores busy {row['cores_busy']}; worker per step (ms): "
        + ", ".join(f"{name} {number(value)}" for name, value in stages.items())
        + "\n  busiest processes (cores): "
        + ", ".join(
            f"{entry['name']}[{entry['pid']}] {entry['cores']}" for entry in row["busiest_processes"]
        ),
        flush=True,
    )


def print_table(rows: list[dict], tokens_per_s: float) -> None:
    print(
        "\n| streams | words/s offered / tokens/s released | gateway hold-back p50 / p99 | within 100 ms "
        "| delta delay p50 / p99 | first token p50 / p99 | CPU per token: gateway / worker / harness "
        "| machine cores busy |"
    )
    print("| ---: | --- | --- | ---: | --- | --- | --- | ---: |")
    for row in rows:
        share = row["hold_back_share_within_100_ms"]
        cpu = row["cpu_us_per_released_token"]
        print(
            f"| {row['streams']} | {number(row['streams'] * tokens_per_s)} "
            f"/ {number(row['released_tokens_per_s'])} "
            f"| {number(row['hold_back_p50_ms'])} / {number(row['hold_back_p99_ms'])} ms "
            f"| {'-' if share is None else f'{100 * share:.1f}%'} "
            f"| {number(row['delta_delay_p50_ms'])} / {number(row['delta_delay_p99_ms'])} ms "
            f"| {number(row['first_token_p50_ms'])} / {number(row['first_token_p99_ms'])} ms "
            f"| {number(cpu['gateway'])} / {number(cpu['worker'])} / {number(cpu['bench'])} us "
            f"| {number(row['cores_busy']['machine'])} |"
        )


def safe_replies_test_model(out_dir: Path) -> str:
    """The tiny random test model (seed 0) with its reply risk head zeroed: its three logits tie, and a
    tie's argmax is the first label, Safe, so no reply is cut and every stream runs its whole length.
    Random reply verdicts cut most replies within a few tokens, which would measure prompts, not
    streams. The arithmetic is the same GEMMs on the same shapes; the prompt's verdicts stay random."""
    from safetensors.torch import load_file, save_file

    from processor.model.testmodel import WEIGHTS_NAME, write_test_model

    write_test_model(out_dir, size="tiny", seed=0)
    weights = load_file(out_dir / WEIGHTS_NAME)
    weights["risk_level_head.weight"].zero_()
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return str(out_dir)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random test model, written here)")
    parser.add_argument("--kafka-bootstrap")
    parser.add_argument("--redis-url")
    parser.add_argument("--streams", default="1,50,200", help="concurrent streams, comma separated")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of streaming per stream count")
    parser.add_argument(
        "--stagger", type=float, default=3, help="seconds the streams' first requests spread over"
    )
    parser.add_argument(
        "--gateways", type=int, default=1, help="gateway replicas (processes); streams alternate between them"
    )
    parser.add_argument("--tokens-per-s", type=float, default=30, help="each stream's upstream pace")
    parser.add_argument("--reply-tokens", type=int, default=90, help="words (one delta each) in a reply")
    parser.add_argument("--warm-seconds", type=float, default=10, help="an unmeasured first load; 0 skips")
    parser.add_argument("--warm-streams", type=int, default=50)
    parser.add_argument("--pause", type=float, default=2, help="seconds between stream counts")
    parser.add_argument(
        "--warmup", type=float, default=120, help="seconds the worker and gateway get to start"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gateway-cpu.json")
    args = parser.parse_args()
    levels = [int(value) for value in args.streams.split(",") if value]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-model-") as scratch:
        model = args.model or safe_replies_test_model(Path(scratch) / "tiny")
        # This process imports torch too: unfrozen, a full collection (~150 ms here) would stall the
        # stand-in LLM and the clients, which a real LLM server and real callers do not.
        with long_lived_heap_frozen():
            rows = asyncio.run(main_async(args, levels, model))
    print_table(rows, args.tokens_per_s)
    facts = run_facts()
    write_result(
        args.out,
        {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "args": {
                key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
            },
            "model": args.model
            or "tiny random test model (seed 0), reply risk head zeroed: every reply token Safe",
            **facts,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
