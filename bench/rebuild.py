"""Rebuild benchmark: what a worker pays when it takes over conversations it has never seen.

After a rebalance (a rolling restart, a scale-up, a crash) the new owner of a partition holds none of
its conversations' KV caches: on each conversation's next event it reads the token history from Redis
and re-runs it through the model before the new token. This measures that, end to end through the
worker's own parts: N conversations of L tokens are written to a real Redis with `SessionStore`, then
a fresh engine (`AsyncGuardEngine` over `GuardEngine`, the store as its history) is asked for one new
token of each conversation at once (the rebuild), and then for one more (a warm step, for scale).

Prints a table and writes JSON (bench/results/rebuild-<device>-<size>.json). Nothing asserts a speed.

    python bench/rebuild.py --size 0.6b-shape --conversations 16,64 --context 128,512
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import torch
from pipeline import ROOT, rows_result, write_result
from redis.asyncio import Redis

from processor.engine import AsyncGuardEngine, EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from processor.local import services
from processor.model.loader import GuardModel, load_guard_model
from processor.model.testmodel import TEST_MODEL_SIZES, write_test_model
from processor.worker.session_store import Session, SessionStore, SessionUpdate

VOCAB_SAMPLE = 150_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=TEST_MODEL_SIZES, default="small", help="random checkpoint shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    parser.add_argument("--conversations", default="16,64", help="comma-separated N")
    parser.add_argument("--context", default="128,512", help="comma-separated L (tokens each)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


async def measure(model: GuardModel, redis: Redis, conversations: int, context: int) -> dict:
    rng = random.Random(conversations * 100_003 + context)
    store = SessionStore(redis, f"bench-rebuild:{time.time_ns()}:", 3600, 60, "bench")
    ids = [f"c-{index}" for index in range(conversations)]
    await store.save(
        [
            SessionUpdate(
                Session(i),
                Session(i, next_seq=1, length=context),
                [rng.randrange(VOCAB_SAMPLE) for _ in range(context)],
            )
            for i in ids
        ]
    )
    cache_dtype = resolve_attention_and_cache("auto", "auto", model.device, model.dtype)[1]
    cache_bytes = int(1.25 * conversations * (context + 32) * bytes_per_token(model.config, cache_dtype))
    engine = AsyncGuardEngine(GuardEngine(model, EngineConfig(kv_cache_bytes=cache_bytes)), history=store)
    try:
        started = time.perf_counter()
        await engine.moderate_many([(i, [rng.randrange(VOCAB_SAMPLE)], context) for i in ids])
        rebuild = time.perf_counter() - started
        started = time.perf_counter()
        await engine.moderate_many([(i, [rng.randrange(VOCAB_SAMPLE)], context + 1) for i in ids])
        warm = time.perf_counter() - started
        rebuilt_tokens = engine.stats().rebuilt_tokens
    finally:
        await engine.close()
    return {
        "conversations": conversations,
        "context": context,
        "rebuilt_tokens": rebuilt_tokens,
        "rebuild_s": round(rebuild, 3),
        "rebuilt_tokens_per_s": round(rebuilt_tokens / rebuild),
        "warm_step_ms": round(1000 * warm, 1),
    }


async def run(args: argparse.Namespace, model: GuardModel, redis_url: str) -> list[dict]:
    redis = Redis.from_url(redis_url)
    try:
        rows = []
        for conversations in [int(n) for n in args.conversations.split(",")]:
            for context in [int(length) for length in args.context.split(",")]:
                rows.append(await measure(model, redis, conversations, context))
                print(rows[-1], flush=True)
        return rows
    finally:
        await redis.aclose()


def main() -> None:
    args = parse_args()
    started = time.time()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gs-bench-rebuild-") as scratch:
        model = load_guard_model(
            write_test_model(Path(scratch) / "model", size=args.size), args.device, args.dtype
        )
        entries, _ = services.ensure(Path(scratch) / "services", ["redis"])
        try:
            rows = asyncio.run(run(args, model, entries["redis"]["url"]))
        finally:
            services.down(Path(scratch) / "services")
    print(f"{'N':>5} {'L':>6} {'rebuilt tokens':>15} {'rebuild s':>10} {'tokens/s':>10} {'warm step ms':>13}")
    for row in rows:
        shape = f"{row['conversations']:>5} {row['context']:>6} {row['rebuilt_tokens']:>15}"
        print(f"{shape} {row['rebuild_s']:>10} {row['rebuilt_tokens_per_s']:>10} {row['warm_step_ms']:>13}")
    out = args.out or ROOT / f"bench/results/rebuild-{args.device.split(':')[0]}-{args.size}.json"
    write_result(out, rows_result(args, started, rows))


if __name__ == "__main__":
    main()
