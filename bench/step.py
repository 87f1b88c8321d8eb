"""Worker step benchmark: the worker's preparation of one step (decode, plan, engine, verdicts), in-process.

What a step costs the worker's main thread with nothing else in the way: records are made here and
run through the real `Worker.prepare` and the real engine; no Kafka, no Redis, no other process. The
pipeline benchmark's figures move with everything that shares the machine; this one isolates the
worker's own CPU per step, at a few step shapes (events per conversation per step, one token each;
the gap between 1 and 10 events a conversation is a step's fixed, per-conversation part) and for
each KV cache dtype asked for, the variants alternating in rounds. Prints a table and writes JSON
(bench/results/step-<device>.json). Not a test: nothing here asserts a speed.

    python bench/step.py --model DIR        # a checkpoint folder (guardstream make-test-model DIR)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from aiokafka import TopicPartition
from pipeline import ROOT, rows_result, write_result  # sys.path: the repository root, for `processor`

from processor.engine import AsyncGuardEngine, GuardEngine
from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from processor.model import GuardModel, load_guard_model
from processor.worker.heap import long_lived_heap_frozen
from processor.worker.metrics import WorkerMetrics
from processor.worker.session_store import Session
from processor.worker.settings import WorkerSettings
from processor.worker.worker import Worker, engine_config

TOPIC = TopicPartition("guard.tokens", 0)
WARMUP_STEPS = 3


class AssignedConsumer:
    """What `Worker.prepare` asks of its consumer: the assignment (everything) and no lag."""

    def assignment(self) -> set[TopicPartition]:
        return {TOPIC}

    def highwater(self, partition: TopicPartition) -> None:
        return None


class Records:
    """Token event records for the step, numbered per conversation as a producer would."""

    def __init__(self, conversations: list[str], seed: int) -> None:
        self.conversations = conversations
        self.next_seq = dict.fromkeys(conversations, 0)
        self.rng = random.Random(seed)
        self.offset = 0

    def batch(self, events_each: int, tokens_each: int = 1) -> dict[TopicPartition, list]:
        records = []
        for conversation_id in self.conversations:
            for _ in range(events_each):
                seq = self.next_seq[conversation_id]
                self.next_seq[conversation_id] += 1
                tokens = [self.rng.randrange(1000, 6000) for _ in range(tokens_each)]
                value = json.dumps(
                    {
                        "conversation_id": conversation_id,
                        "seq": seq,
                        "role": "assistant",
                        "token_ids": tokens,
                        "ts": time.time(),
                    }
                ).encode()
                records.append(
                    SimpleNamespace(
                        key=conversation_id.encode(),
                        value=value,
                        timestamp=0,
                        topic=TOPIC.topic,
                        partition=TOPIC.partition,
                        offset=self.offset,
                    )
                )
                self.offset += 1
        self.rng.shuffle(records)  # as several partitions' records interleave in a real poll
        return {TOPIC: records}


async def measure(args, model: GuardModel, kv_cache_dtype: str, events_each: int, seed: int) -> dict:
    """A fresh worker and engine; every conversation filled to --context, then --steps measured steps."""
    _, cache_dtype = resolve_attention_and_cache(
        args.attention_backend, kv_cache_dtype, model.device, model.dtype
    )
    # Room for the chat template's tokens and each conversation's last, partly filled block: a
    # conversation evicted mid-run would fail the step (no history store here to rebuild it from).
    tokens_each = args.context + 64 + (args.steps + WARMUP_STEPS) * events_each
    cache_bytes = args.conversations * tokens_each * bytes_per_token(model.config, cache_dtype)
    settings = WorkerSettings(
        model=str(args.model),
        template=args.template,
        kv_cache_bytes=cache_bytes,
        kv_cache_dtype=kv_cache_dtype,
        attention_backend=args.attention_backend,
    )
    front = AsyncGuardEngine(GuardEngine(model, engine_config(settings)))
    worker = Worker(settings, model, front, None, AssignedConsumer(), None, WorkerMetrics())  # type: ignore[arg-type]
    conversations = [f"step-bench-{number:05d}" for number in range(args.conversations)]
    for conversation_id in conversations:
        worker.sessions.put(Session(conversation_id, stored=True))  # no Redis: sessions start here
    records, stop = Records(conversations, seed), asyncio.Event()
    await worker.prepare(records.batch(1, tokens_each=args.context), stop)
    seconds = []
    for step in range(WARMUP_STEPS + args.steps):
        batch = records.batch(events_each)
        started = time.process_time()
        await worker.prepare(batch, stop)
        if step >= WARMUP_STEPS:
            seconds.append(time.process_time() - started)
    await front.close()
    seconds.sort()
    events = args.conversations * events_each
    median = statistics.median(seconds)
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "events_per_conversation": events_each,
        "conversations": args.conversations,
        "events_per_step": events,
        "context_first": args.context,
        "context_last": args.context + 1 + (WARMUP_STEPS + args.steps) * events_each,
        "ms_per_step_median": round(1000 * median, 2),
        "ms_per_step_q1": round(1000 * seconds[len(seconds) // 4], 2),
        "us_per_event_median": round(1e6 * median / events, 2),
    }


async def run(args, model: GuardModel) -> list[dict]:
    rows: list[dict] = []
    for round_index in range(args.rounds):
        for kv_cache_dtype in args.kv_cache_dtypes:
            for events_each in args.events_per_conversation:
                row = await measure(args, model, kv_cache_dtype, events_each, seed=round_index)
                row["round"] = round_index + 1
                rows.append(row)
                print(
                    f"  round {row['round']}, {kv_cache_dtype} KV, {events_each} events a conversation: "
                    f"{row['ms_per_step_median']} ms a step, {row['us_per_event_median']} us an event",
                    flush=True,
                )
    return rows


def print_table(args, rows: list[dict]) -> None:
    print(
        f"\nworker step, in-process: {args.conversations} conversations, one token an event, from "
        f"{args.context} keys, {args.steps} steps (median CPU of the best round)"
    )
    header = (
        f"{'KV cache':>9} {'events/conv':>12} {'events/step':>12} {'ms/step':>9} {'us/event':>9}  context"
    )
    print(header)
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["kv_cache_dtype"], row["events_per_conversation"])
        if key not in best or row["ms_per_step_median"] < best[key]["ms_per_step_median"]:
            best[key] = row
    for (kv_cache_dtype, events_each), row in best.items():
        print(
            f"{kv_cache_dtype:>9} {events_each:>12} {row['events_per_step']:>12} "
            f"{row['ms_per_step_median']:>9.1f} {row['us_per_event_median']:>9.1f}  "
            f"{row['context_first']}-{row['context_last']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the worker's CPU default here)"
    )
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--context", type=int, default=400, help="tokens each conversation holds at the start"
    )
    parser.add_argument(
        "--events-per-conversation",
        default="1,4,10",
        help="step shapes: events (one token each) per conversation per step, comma separated",
    )
    parser.add_argument("--kv-cache-dtypes", default="auto", help="comma separated: auto, float16, ...")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--template", default="chat", choices=["chat", "raw"])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per shape")
    parser.add_argument("--rounds", type=int, default=2, help="every variant once a round, alternating")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/step-<device>.json")
    args = parser.parse_args()
    args.events_per_conversation = [int(value) for value in args.events_per_conversation.split(",")]
    args.kv_cache_dtypes = args.kv_cache_dtypes.split(",")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = load_guard_model(str(args.model), args.device, args.dtype)
    started = time.time()
    with long_lived_heap_frozen():  # as the worker runs
        rows = asyncio.run(run(args, model))
    print_table(args, rows)
    write_result(
        args.out or ROOT / "bench" / "results" / f"step-{args.device.split(':')[0]}.json",
        rows_result(args, started, rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
