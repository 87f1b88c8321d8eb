"""The step histogram exports what prometheus_client's own Histogram would for the same values."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from processor.worker.metrics import LATENCY_BUCKETS, StepHistogram


def samples(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    pairs = (line.rsplit(" ", 1) for line in lines if not line.startswith("#") and "_created" not in line)
    return {name: float(value) for name, value in pairs}


def test_step_histogram_matches_prometheus_histogram():
    rng = random.Random(5)
    steps = [
        [rng.choice((*LATENCY_BUCKETS, rng.expovariate(10.0))) for _ in range(rng.randrange(50))]
        for _ in range(20)
    ]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = StepHistogram("latency_seconds", "doc", LATENCY_BUCKETS, ours)
    single = Histogram("latency_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    for values in steps:
        batched.observe_many(values)  # values on a bucket's bound count in that bucket (le)
        for value in values:
            single.observe(value)
    expected = samples(theirs)
    assert len(expected) == len(LATENCY_BUCKETS) + 3  # every bucket, +Inf, count, sum
    assert samples(ours) == pytest.approx(expected)  # the sum may differ in its last bits (order)
