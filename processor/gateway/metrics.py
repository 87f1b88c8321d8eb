"""The gateway's Prometheus metrics, in a registry of its own. No label carries a conversation id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# From a few ms (a verdict within the same step) to the verdict timeout's range.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "guardstream_gateway_requests_total",
            "Requests by endpoint and outcome (stop, content_filter, prompt_blocked, timeout, "
            "upstream_error, unauthorized, bad_request, disconnected).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.first_release = Histogram(
            "guardstream_gateway_first_release_seconds",
            "From the request's arrival to the first text released to the caller.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.hold_back = Histogram(
            "guardstream_gateway_hold_back_seconds",
            "Per released token: from its arrival from the upstream to its release to the caller.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cuts = Counter(
            "guardstream_gateway_cuts_total",
            "Replies cut at an alert, by the checkpoint's category.",
            ["category"],
            registry=registry,
        )
        self.audit_alerts = Counter(
            "guardstream_gateway_audit_alerts_total",
            "Alerts recorded in audit mode (nothing cut), by category.",
            ["category"],
            registry=registry,
        )
        self.prompt_blocks = Counter(
            "guardstream_gateway_prompt_blocks_total",
            "Requests whose prompt flagged, by category.",
            ["category"],
            registry=registry,
        )
        self.verdict_timeouts = Counter(
            "guardstream_gateway_verdict_timeouts_total",
            "Verdicts that did not arrive within --verdict-timeout, by what --fail did.",
            ["fail"],
            registry=registry,
        )
        self.fail_open_releases = Counter(
            "guardstream_gateway_fail_open_releases_total",
            "Tokens released without a verdict under --fail open.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "guardstream_gateway_upstream_errors_total",
            "Upstream calls that failed (error status, broken stream, silence).",
            registry=registry,
        )
        self.worker_errors = Counter(
            "guardstream_gateway_worker_errors_total",
            "Error verdicts received for the gateway's conversations.",
            registry=registry,
        )
