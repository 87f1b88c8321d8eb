"""The worker's Prometheus metrics, in a registry of its own (tests run several workers in one process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Verdict latency from the producer's ts: the goal is p99 under 100 ms, so resolve well below it.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
STAGE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Where a step's time goes (prepare runs on the loop; the rest is its finish, in the background):
#   wait     the loop waiting for earlier finishes before it may prepare another step (pipeline full)
#   prepare  decode, sessions, plan, engine, verdicts;  engine: its share spent awaiting the model
#   publish  sending verdicts and waiting for their acks;  order: waiting for the previous finish
#   save     the Redis write;  commit  the offset commit
STAGES = ("wait", "prepare", "engine", "publish", "order", "save", "commit")


class StepHistogram(Collector):
    """A histogram fed a step's values at once, exported like prometheus_client's Histogram.

    Why not Histogram: it takes one value a call, each updating two lock-guarded counters (~2 us), and
    the worker observes every token verdict's latency: thousands a step. Here a value costs a bisect.
    Read and written on the event loop's thread only (the /metrics server runs on it too).
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        counts, bounds = self._counts, self._bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # le: a value on a bound counts in that bucket
        self._sum += sum(values)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("guardstream_events", "Token events consumed", ["outcome"], registry=r)
        self.tokens = Counter("guardstream_tokens", "Tokens fed to the model", registry=r)
        self.verdicts = Counter("guardstream_verdicts", "Verdict events published", ["kind"], registry=r)
        self.dead_letters = Counter("guardstream_dead_letters", "Records sent to the DLQ", registry=r)
        self.verdict_latency = StepHistogram(
            "guardstream_verdict_latency_seconds",
            "From the token event's ts to its verdicts being published",
            LATENCY_BUCKETS,
            r,
        )
        # Split of the latency above: how old an event is when its step decodes it (waiting in Kafka,
        # for a poll and for a core), the rest being the step's own work and publishing.
        self.event_age = StepHistogram(
            "guardstream_event_age_seconds",
            "From the token event's ts to its step decoding it",
            LATENCY_BUCKETS,
            r,
        )
        self.step_events = Histogram(
            "guardstream_step_events", "Token events per step", buckets=STEP_BUCKETS, registry=r
        )
        self.step_tokens = Histogram(
            "guardstream_step_tokens", "Tokens per step", buckets=STEP_BUCKETS, registry=r
        )
        self.step_seconds = Histogram("guardstream_step_seconds", "Wall time of a step", registry=r)
        self.stage_seconds = Histogram(
            "guardstream_step_stage_seconds",
            "Wall time of each stage of a step (see STAGES in processor/worker/metrics.py)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.step_failures = Counter("guardstream_step_failures", "Steps retried after an error", registry=r)
        self.session_conflicts = Counter(
            "guardstream_session_conflicts", "Session writes refused: another worker moved it on", registry=r
        )
        self.active_conversations = Gauge(
            "guardstream_active_conversations", "Conversations with GPU state", registry=r
        )
        self.cache_blocks_used = Gauge("guardstream_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.cache_blocks_free = Gauge("guardstream_kv_blocks_free", "KV cache blocks free", registry=r)
        self.evictions = Gauge(
            "guardstream_evictions", "Conversations evicted from the KV cache (total)", registry=r
        )
        self.rebuilt_tokens = Gauge(
            "guardstream_rebuilt_tokens",
            "Tokens re-run to rebuild evicted or moved conversations (total)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "guardstream_consumer_lag", "Records behind the partition end", ["partition"], registry=r
        )

    def observe_engine(self, stats: object) -> None:
        """Copies the engine's counters (EngineStats) into gauges."""
        for gauge, name in (
            (self.active_conversations, "active_conversations"),
            (self.cache_blocks_used, "blocks_used"),
            (self.cache_blocks_free, "blocks_free"),
            (self.evictions, "evictions"),
            (self.rebuilt_tokens, "rebuilt_tokens"),
        ):
            value = getattr(stats, name, None)
            if value is not None:
                gauge.set(value)
