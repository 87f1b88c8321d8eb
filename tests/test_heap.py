"""The hot loops' garbage-collection setting: frozen heap and rarer young collections, undone after."""

from __future__ import annotations

import gc

from processor.heap import GC_YOUNG_THRESHOLD, long_lived_heap_frozen


def test_the_heap_is_frozen_inside_and_restored_after():
    thresholds = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    with long_lived_heap_frozen():
        assert gc.get_freeze_count() > frozen_before
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
