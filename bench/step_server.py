"""One code tree's worker, preparing steps on command: the process `bench/step.py` measures.

Started by bench/step.py, once per code tree it compares (`--root`: this checkout, or a git revision
unpacked elsewhere), so that nothing of another tree is imported here: this file imports `processor`
only after putting `--root` first on sys.path. It builds a real `Worker` and engine on the model, fills
every conversation to `--context` tokens, builds the step's records ahead, freezes the heap as the
worker does, says `ready` (a JSON line on stdout), then prepares one step per `step` line on stdin and
answers with that step's CPU seconds (`time.process_time`). No Kafka, no Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

TOPIC, PARTITION = "guard.tokens", 0
WARMUP_STEPS = 3


class AssignedConsumer:
    """What `Worker.prepare` asks of its consumer: the assignment (everything) and no lag."""

    def __init__(self, partition: object) -> None:
        self.partition = partition

    def assignment(self) -> set:
        return {self.partition}

    def highwater(self, partition: object) -> None:
        return None


class Records:
    """Token event records for a step, numbered per conversation as a producer would."""

    def __init__(self, conversations: list[str], partition: object, seed: int) -> None:
        self.conversations = conversations
        self.partition = partition
        self.next_seq = dict.fromkeys(conversations, 0)
        self.rng = random.Random(seed)
        self.offset = 0

    def batch(self, events_each: int, tokens_each: int = 1) -> dict:
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
                        topic=TOPIC,
                        partition=PARTITION,
                        offset=self.offset,
                    )
                )
                self.offset += 1
        self.rng.shuffle(records)  # as several partitions' records interleave in a real poll
        return {self.partition: records}


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> None:
    import torch
    from aiokafka import TopicPartition

    import processor
    from processor.engine import AsyncGuardEngine, GuardEngine
    from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
    from processor.heap import long_lived_heap_frozen
    from processor.model import load_guard_model
    from processor.worker.metrics import WorkerMetrics
    from processor.worker.session_store import Session
    from processor.worker.settings import WorkerSettings
    from processor.worker.worker import Worker

    try:
        from processor.worker.serve import engine_config
    except ImportError:  # a --baseline revision whose worker.py still holds it
        from processor.worker.worker import engine_config

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = load_guard_model(str(args.model), args.device, args.dtype)
    _, cache_dtype = resolve_attention_and_cache(
        args.attention_backend, args.kv_cache_dtype, model.device, model.dtype
    )
    # Room for the chat template's tokens and each conversation's last, partly filled block: a
    # conversation evicted mid-run would fail the step (no history store here to rebuild it from).
    tokens_each = args.context + 64 + (args.steps + WARMUP_STEPS) * args.events
    settings = WorkerSettings(
        model=str(args.model),
        template=args.template,
        kv_cache_bytes=args.conversations * tokens_each * bytes_per_token(model.config, cache_dtype),
        kv_cache_dtype=args.kv_cache_dtype,
        attention_backend=args.attention_backend,
    )
    front = AsyncGuardEngine(GuardEngine(model, engine_config(settings)))
    partition = TopicPartition(TOPIC, PARTITION)
    worker = Worker(settings, model, front, None, AssignedConsumer(partition), None, WorkerMetrics())  # type: ignore[arg-type]
    conversations = [f"step-bench-{number:05d}" for number in range(args.conversations)]
    for conversation_id in conversations:
        worker.sessions.put(Session(conversation_id, stored=True))  # no Redis: sessions start here
    records, stop = Records(conversations, partition, args.seed), asyncio.Event()
    await worker.prepare(records.batch(1, tokens_each=args.context), stop)
    for _ in range(WARMUP_STEPS):
        await worker.prepare(records.batch(args.events), stop)
    getattr(worker, "release_spent", lambda: None)()
    batches = [records.batch(args.events) for _ in range(args.steps)]
    with long_lived_heap_frozen():  # as the worker runs
        answer({"ready": True, "processor": str(Path(processor.__file__).parent)})
        for batch in batches:
            if sys.stdin.readline().strip() != "step":
                break
            started = time.process_time()
            await worker.prepare(batch, stop)
            # What the worker frees during the next poll's wait (or on return, in trees that free it
            # there): a step's work either way.
            getattr(worker, "release_spent", lambda: None)()
            answer({"seconds": time.process_time() - started})
    await front.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="the code tree whose processor runs")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument(
        "--events", type=int, default=1, help="events (one token each) per conversation a step"
    )
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--template", default="chat", choices=["chat", "raw"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))  # before anything imports `processor`
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
