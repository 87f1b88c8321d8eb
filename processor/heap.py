"""Garbage collection for a long-running hot loop (the worker's, the gateway's): what is alive at the
start is never walked again.

The model, tokenizer and libraries leave hundreds of thousands to millions of long-lived objects.
Without `gc.freeze()` every full collection walks them all, a pause that stalls the loop, and a loop
that allocates tens of thousands of short-lived objects a step runs many collections.

A young collection walks every object allocated since the last one that is still alive, so its pause
grows with what the loop keeps across steps: in the worker, a step in flight that kept its records and
plans (about a dozen objects an event) would be walked again and again. A prepared step keeps only
what its finish needs (`PreparedStep`), and the last step's records are freed during the next poll.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Allocations between young collections (CPython's default is 700): a step allocates tens of thousands
# of short-lived objects, and at the default it would run dozens of collections a step.
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
