"""What lets the worker prepare step N+1 while step N publishes, saves and commits.

- `StepChain`: the finishes in flight, run in step order; a failed one voids the ones after it.
- `SessionCache`: the sessions as the newest prepared step left them, ahead of Redis until their
  finish lands; the next step reads them from here instead of Redis.
- `SettledHistory`: the engine's token-history source, read only after the finishes in flight have
  written their tokens to Redis (a cache rebuild must see every token fed so far).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from processor.worker.session_store import Session, SessionStore


class StepChain:
    def __init__(self, depth: int) -> None:
        # Finishes in flight at most (WorkerSettings.steps_in_flight); the next prepare waits beyond that.
        self.depth = depth
        self._tasks: deque[asyncio.Task[None]] = deque()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, finish: Callable[[asyncio.Task[None] | None], Awaitable[None]]) -> None:
        """Start `finish(previous)`; it must await `previous` before the writes that need order."""
        previous = self._tasks[-1] if self._tasks else None
        self._tasks.append(asyncio.ensure_future(finish(previous)))

    async def wait(self, keep: int = 0) -> BaseException | None:
        """Wait until at most `keep` finishes are in flight; returns the first failure among them.

        On a failure, every later finish is void too (each awaits its predecessor): all are waited.
        """
        failure: BaseException | None = None
        while self._tasks and (len(self._tasks) > keep or self._tasks[0].done() or failure):
            task = self._tasks.popleft()
            try:
                await task
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failure = failure or error
        return failure

    async def settled(self) -> None:
        """Wait for the finishes in flight now, whatever their outcome."""
        pending = list(self._tasks)
        if pending:
            await asyncio.wait(pending)


class SessionCache:
    """Sessions by conversation, as the last prepared step left them (marked stored: by the time a
    later step's conditional write runs, the earlier finish has written them)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, conversation_id: str) -> Session | None:
        return self._sessions.get(conversation_id)

    def put(self, session: Session) -> Session:
        cached = session if session.stored else session._replace(stored=True)
        self._sessions[session.conversation_id] = cached
        return cached

    def drop(self, conversation_ids: Iterable[str]) -> None:
        for conversation_id in conversation_ids:
            self._sessions.pop(conversation_id, None)

    def drop_if_unchanged(self, sessions: Iterable[Session]) -> None:
        """Drop entries still holding exactly these sessions (closed ones, once written)."""
        for session in sessions:
            if self._sessions.get(session.conversation_id) is session:
                del self._sessions[session.conversation_id]

    def clear(self) -> None:
        self._sessions.clear()


class SettledHistory:
    """`TokenHistory` for the engine: the session store, read after the finishes in flight."""

    def __init__(self, store: SessionStore, chain: StepChain) -> None:
        self._store = store
        self._chain = chain

    async def load(self, conversation_id: str, length: int) -> list[int]:
        await self._chain.settled()  # a failed finish voids the asking step too; reading is harmless
        return await self._store.load(conversation_id, length)
