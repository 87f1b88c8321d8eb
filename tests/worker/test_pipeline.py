"""The step chain, the session cache and the settled history (pure asyncio, no services)."""

from __future__ import annotations

import asyncio

from processor.worker.pipeline import SessionCache, SettledHistory, StepChain
from processor.worker.session_store import Session


async def test_finishes_run_in_order_and_a_failure_voids_the_later_ones():
    chain, events = StepChain(depth=3), []
    release = {name: asyncio.Event() for name in "abc"}

    def finish(name: str, fail: bool = False):
        async def run(previous):
            await release[name].wait()
            if previous is not None:
                await previous
            events.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")

        return run

    chain.start(finish("a"))
    chain.start(finish("b", fail=True))
    chain.start(finish("c"))
    for name in "cba":  # released in reverse: the chain still completes a, b, c in order
        release[name].set()
        await asyncio.sleep(0)
    failure = await chain.wait()
    assert events == ["a", "b"]  # c awaited b, which failed: c never wrote
    assert str(failure) == "b failed"
    assert len(chain) == 0


async def test_wait_keeps_the_newest_in_flight():
    chain, gate = StepChain(depth=2), asyncio.Event()

    async def slow(previous):
        await gate.wait()

    async def quick(previous):
        return None

    chain.start(quick)
    chain.start(slow)
    assert await chain.wait(keep=1) is None
    assert len(chain) == 1  # quick was waited for, slow is still in flight
    gate.set()
    assert await chain.wait() is None


async def test_settled_history_reads_after_the_finishes_in_flight():
    chain, written = StepChain(depth=2), []

    class Store:
        async def load(self, conversation_id: str, length: int) -> list[int]:
            return list(written[:length])

    async def save(previous):
        await asyncio.sleep(0.05)
        written.extend([7, 8, 9])

    chain.start(save)
    assert await SettledHistory(Store(), chain).load("c", 3) == [7, 8, 9]


def test_cache_marks_sessions_stored_and_drops_only_unchanged_ones():
    cache = SessionCache()
    first = cache.put(Session("c", stored=False, next_seq=3))
    assert first.stored and cache.get("c") is first
    newer = cache.put(Session("c", stored=True, next_seq=5))
    cache.drop_if_unchanged([first])  # a later step moved it on: keep the newer one
    assert cache.get("c") is newer
    cache.drop_if_unchanged([newer])
    assert cache.get("c") is None
