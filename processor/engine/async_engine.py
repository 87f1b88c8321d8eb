"""The asyncio front of the engine: callers await results while steps run on a worker thread.

Submissions are admitted into the engine only between steps, on the event loop, so the engine is
never touched by two threads at once; short steps run on the loop itself (INLINE_STEP_SECONDS). A
step starts as soon as work is waiting (no timer): whatever arrived while the previous step ran forms
the next batch, which is what overlaps Kafka and Redis I/O with compute.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from processor.engine.engine import EngineStats, GuardEngine
from processor.engine.results import ChunkResult

log = logging.getLogger(__name__)

# Steps expected to take less CPU than this run on the event loop's own thread. On the engine thread a
# short step pays more for the hand-off than it costs: every torch op releases and re-takes the GIL,
# and each re-take waits while the loop runs Python. Longer steps go to the thread, so that the loop
# keeps serving Kafka heartbeats and I/O (figures in docs/benchmarks.md).
INLINE_STEP_SECONDS = 0.050


class TokenHistory(Protocol):
    """Where the engine gets a conversation's earlier tokens when it has to rebuild its cache."""

    async def load(self, conversation_id: str, length: int) -> list[int]:
        """The first `length` token ids fed to the model for this conversation."""
        ...


class HistoryUnavailableError(RuntimeError):
    """The history store returned fewer tokens than the caller said were fed before."""


class _Batch:
    """The results of one `moderate_many` call, handed over through one future when the last arrives.

    One future per call, not per conversation: a worker step submits hundreds of conversations, and
    a future (and the task awaiting it) each cost several microseconds of event-loop work.
    """

    def __init__(self, count: int) -> None:
        self.results: list[ChunkResult | Exception | None] = [None] * count
        self.remaining = count
        self.future: asyncio.Future[list[ChunkResult | Exception]]
        self.future = asyncio.get_running_loop().create_future()
        if count == 0:
            self.future.set_result([])

    def settle(self, index: int, outcome: ChunkResult | Exception) -> None:
        if self.results[index] is not None:
            return
        self.results[index] = outcome
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Submission:
    conversation_id: str
    token_ids: list[int]
    known_length: int | None  # None: a release
    batch: _Batch | None
    index: int = 0  # in batch.results


class AsyncGuardEngine:
    def __init__(self, engine: GuardEngine, history: TokenHistory | None = None) -> None:
        self.engine = engine
        self.history = history
        self._queue: list[_Submission] = []
        self._waiting: dict[int, tuple[_Batch, int]] = {}  # request id -> where its result goes
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-engine")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def moderate(self, conversation_id: str, token_ids: list[int], known_length: int) -> ChunkResult:
        """Run `token_ids`, which follow the `known_length` tokens already fed for this conversation.

        When the engine does not hold exactly those tokens (evicted, new owner, restart), it loads
        them from the history store and rebuilds the cache first. Calls for one conversation are
        applied in call order.
        """
        [result] = await self.moderate_many([(conversation_id, token_ids, known_length)])
        if isinstance(result, Exception):
            raise result
        return result

    async def moderate_many(
        self, requests: list[tuple[str, list[int], int]]
    ) -> list[ChunkResult | Exception]:
        """`moderate` for many (conversation_id, token_ids, known_length) at once, answered together.

        A request that fails (its history unavailable, a conflict) gets its exception in its place in
        the answer; the others are unaffected.
        """
        batch = _Batch(len(requests))
        for index, (conversation_id, token_ids, known_length) in enumerate(requests):
            self._enqueue(_Submission(conversation_id, list(token_ids), known_length, batch, index))
        return await batch.future

    async def release(self, conversation_id: str) -> None:
        """Free the conversation's cache after the work queued before this call."""
        self._enqueue(_Submission(conversation_id, [], None, None))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # -- the loop ---------------------------------------------------------------------------------

    def _enqueue(self, submission: _Submission) -> None:
        if self._closing:
            raise RuntimeError("the engine is closed")
        self._queue.append(submission)
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="guard-engine-steps")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self.engine.has_pending():
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._admit()
            if not self.engine.has_pending():
                continue
            try:
                if self._runs_inline():
                    results = self.engine.step()
                else:
                    results = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as error:  # a failed step must not leave callers waiting forever
                log.exception("engine step failed; dropping all cached conversations")
                self._fail_all(error)
                continue
            waiting = self._waiting
            for result in results:
                place = waiting.pop(result.request_id, None)
                if place is not None:
                    place[0].settle(place[1], result)

    def _runs_inline(self) -> bool:
        predicted = self.engine.predicted_step_seconds()
        return predicted is not None and predicted <= INLINE_STEP_SECONDS

    async def _admit(self) -> None:
        submissions, self._queue = self._queue, []
        histories = await self._load_histories(submissions)
        for submission in submissions:
            try:
                self._admit_one(submission, histories)
            except Exception as error:
                if submission.batch is not None:
                    submission.batch.settle(submission.index, error)

    def _placement(self, conversation_id: str, known_length: int) -> str:
        """How a submission that follows `known_length` tokens fits what the engine holds:
        "append", "truncate" (the engine ran tokens the caller never made durable), "rebuild"
        (the engine lacks some of them) or "conflict" (work queued that the caller did not count)."""
        position = self.engine.next_position(conversation_id)
        if position == known_length or (position is None and known_length == 0):
            return "append"
        if position is None:
            return "rebuild"
        if not self.engine.is_idle(conversation_id):
            return "conflict"
        return "truncate" if position > known_length else "rebuild"

    async def _load_histories(self, submissions: list[_Submission]) -> dict[str, list[int]]:
        """Fetch, concurrently, the history of each conversation whose first submission needs it."""
        wanted: dict[str, int] = {}
        seen: set[str] = set()
        for submission in submissions:
            conversation_id = submission.conversation_id
            if conversation_id in seen:
                continue
            seen.add(conversation_id)
            known = submission.known_length
            if known is not None and self._placement(conversation_id, known) == "rebuild":
                wanted[conversation_id] = known
        if not wanted:
            return {}
        if self.history is None:
            return {}
        loaded = await asyncio.gather(
            *(self.history.load(conversation_id, length) for conversation_id, length in wanted.items()),
            return_exceptions=True,
        )
        return {
            conversation_id: tokens
            for conversation_id, tokens in zip(wanted, loaded, strict=True)
            if isinstance(tokens, list)
        }

    def _admit_one(self, submission: _Submission, histories: dict[str, list[int]]) -> None:
        engine, conversation_id, known = self.engine, submission.conversation_id, submission.known_length
        if known is None:
            engine.release(conversation_id)
            return
        assert submission.batch is not None
        placement = self._placement(conversation_id, known)
        if placement == "conflict":
            raise ValueError(
                f"conversation {conversation_id!r}: submission follows {known} tokens but the engine "
                f"has work queued up to position {engine.next_position(conversation_id)}"
            )
        if placement == "truncate":
            engine.truncate(conversation_id, known)
        if placement in ("append", "truncate"):
            request_id = engine.submit(conversation_id, submission.token_ids)
        else:
            history = histories.pop(conversation_id, None)
            if history is None or len(history) < known:
                raise HistoryUnavailableError(
                    f"conversation {conversation_id!r} needs its first {known} tokens to rebuild its cache, "
                    f"the history store gave {0 if history is None else len(history)}"
                )
            request_id = engine.submit(conversation_id, submission.token_ids, rebuild_prefix=history[:known])
        self._waiting[request_id] = (submission.batch, submission.index)

    def _fail_all(self, error: Exception) -> None:
        for batch, index in self._waiting.values():
            batch.settle(index, error)
        self._waiting.clear()
        self.engine.release_all()
