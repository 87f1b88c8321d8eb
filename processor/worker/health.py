"""Whether the worker makes progress, as /healthz reports it: a hung step or a consumer that stopped
fetching turns it unhealthy, where /readyz alone would still say ready."""

from __future__ import annotations

import time
from collections.abc import Callable


class StallWatch:
    """Steps under way and the consumer's fetches, against a bound of `stall_seconds`.

    A step is under way from its prepare until its commit or its failure. The worker is stalled when a
    step has been under way longer than the bound with no step ending meanwhile, or when it holds
    partitions and no fetch has returned for that long (the loop polls at least every poll timeout)."""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._under_way = 0
        self._progress = clock()  # the last step's end, or the start of the oldest step under way since
        self._fetched = clock()

    def step_began(self) -> None:
        if self._under_way == 0:
            self._progress = self._clock()
        self._under_way += 1

    def step_ended(self) -> None:
        self._under_way -= 1
        self._progress = self._clock()

    def fetched(self) -> None:
        self._fetched = self._clock()

    def stall(self, holds_partitions: bool) -> str | None:
        """Why the worker is stalled, or None."""
        now = self._clock()
        if self._under_way and now - self._progress > self.stall_seconds:
            return (
                f"no step has finished for {now - self._progress:.0f} s with {self._under_way} under way "
                f"(--stall-seconds {self.stall_seconds:g})"
            )
        if holds_partitions and now - self._fetched > self.stall_seconds:
            return (
                f"the consumer has not fetched for {now - self._fetched:.0f} s while holding partitions "
                f"(--stall-seconds {self.stall_seconds:g})"
            )
        return None
