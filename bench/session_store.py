"""Session store benchmark: what a step's Redis write costs on one Redis, on a Redis Cluster, and on a
cluster with `--redis-wait-replicas 1` (Redis WAIT before the commit).

Each step writes `--conversations` sessions, one token each, through the worker's own
`SessionStore.save` (the conditional Lua write, one call per hash slot on a cluster). The variants
take turns, `--steps` steps each per round, for `--rounds` rounds, against local services started
here (processor.local; all on this machine's cores). Per variant: the wall time of a step's save
(p50 / p99) and this process's CPU time per step (packing and the client's pipeline: what the worker
pays), with the heap frozen as the worker's is. Prints a table and writes JSON
(bench/results/session-store-cpu.json). Nothing asserts a speed.

    python bench/session_store.py --conversations 256 --steps 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import ROOT, rows_result, write_result
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from processor.heap import long_lived_heap_frozen
from processor.local import services
from processor.worker.session_store import Session, SessionStore, SessionUpdate

VARIANTS = (("redis", 0), ("redis-cluster", 0), ("redis-cluster", 1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=256, help="sessions a step writes")
    parser.add_argument("--steps", type=int, default=200, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/session-store-cpu.json")
    return parser.parse_args()


class Variant:
    def __init__(self, name: str, url: str, wait_replicas: int, conversations: int) -> None:
        self.name = f"{name}, wait {wait_replicas}"
        client = RedisCluster if name == "redis-cluster" else Redis
        self.redis = client.from_url(url)
        prefix = f"bench:{time.time_ns()}:"
        self.store = SessionStore(self.redis, prefix, 600, 60, "bench", wait_replicas, wait_timeout_ms=1000)
        self.sessions = [Session(f"c-{i}") for i in range(conversations)]
        self.wall: list[float] = []
        self.cpu: list[float] = []

    async def step(self) -> None:
        updates = [
            SessionUpdate(s, s._replace(next_seq=s.next_seq + 1, length=s.length + 1), [s.length + 100])
            for s in self.sessions
        ]
        wall, cpu = time.perf_counter(), time.process_time()
        conflicts = await self.store.save(updates)
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)
        assert not conflicts, conflicts
        self.sessions = [update.after._replace(stored=True) for update in updates]

    def row(self) -> dict:
        wall = sorted(self.wall)
        return {
            "variant": self.name,
            "steps": len(wall),
            "save_ms_p50": round(1000 * statistics.median(wall), 2),
            "save_ms_p99": round(1000 * wall[int(0.99 * (len(wall) - 1))], 2),
            "cpu_ms_per_step": round(1000 * statistics.fmean(self.cpu), 2),
        }


async def run(args: argparse.Namespace, urls: dict[str, str]) -> list[dict]:
    variants = [Variant(name, urls[name], wait, args.conversations) for name, wait in VARIANTS]
    for variant in variants:  # connections, the script, the sessions' first write: not measured
        await variant.step()
        variant.wall.clear()
        variant.cpu.clear()
    for _ in range(args.rounds):
        for variant in variants:
            for _ in range(args.steps):
                await variant.step()
    for variant in variants:
        await variant.redis.aclose()
    return [variant.row() for variant in variants]


def main() -> None:
    args = parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gs-bench-redis-") as state:
        entries, _ = services.ensure(Path(state), ["redis", "redis-cluster"])
        try:
            # The worker runs with its long-lived heap frozen; without it a full collection of this
            # process's imports (~130 ms) lands in one step's save and is all that p99 shows.
            with long_lived_heap_frozen():
                rows = asyncio.run(run(args, {name: entry["url"] for name, entry in entries.items()}))
        finally:
            services.down(Path(state))
    print(f"{'variant':<24} {'steps':>6} {'save p50 ms':>12} {'save p99 ms':>12} {'CPU ms/step':>12}")
    for row in rows:
        print(
            f"{row['variant']:<24} {row['steps']:>6} {row['save_ms_p50']:>12} {row['save_ms_p99']:>12} "
            f"{row['cpu_ms_per_step']:>12}"
        )
    write_result(args.out, rows_result(args, started, rows))


if __name__ == "__main__":
    main()
