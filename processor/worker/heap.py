"""Garbage collection for a long-running hot loop: what is alive at the start is never walked again.

The model, tokenizer and libraries leave hundreds of thousands to millions of long-lived objects.
Without `gc.freeze()` every full collection walks them all (measured in the benchmark's harness, 245
thousand objects: pauses of 80-220 ms, several a minute, stalling its producer and verdict reader),
and a loop that allocates tens of thousands of short-lived objects a step runs many collections.

A young collection walks every object allocated since the last one that is still alive, so its pause
grows with what the loop keeps across steps: steps in flight that kept their records and plans (~13
objects an event) made 45,000-80,000 of them, and 50-80 ms pauses every few seconds at 10,000 events/s
(measured with `gc.callbacks`). A prepared step now keeps only what its finish needs
(`PreparedStep`), and a 25 s run at 10,000 events/s ran no collection at all.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Allocations between young collections (CPython's default is 700): a step allocates tens of thousands
# of short-lived objects, and collecting that often cost a fifth of the loop's time.
GC_YOUNG_THRESHOLD = 50_000


@contextlib.contextmanager
def long_lived_heap_frozen() -> Iterator[None]:
    """Freeze what exists now out of the collector's sight and collect the young less often; undone
    on exit (so that interpreter shutdown collects everything: extensions check for leaks)."""
    gc.freeze()
    default_thresholds = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *default_thresholds[1:])
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*default_thresholds)
