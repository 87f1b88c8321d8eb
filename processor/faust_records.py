"""The wire schema as faust-streaming records, for faust apps that read verdicts or send token events.

Install with `pip install 'guardstream[faust]'`. The worker never imports this module: faust stays out of
its hot path (docs/worker.md, "Why plain aiokafka").

    verdicts = app.topic("guard.verdicts", key_type=str, value_type=VerdictEvent)

The records carry the fields and types of `processor.events`, in the same JSON, without faust's
`__faust` metadata: a `TokenEvent` record a faust app sends is a token event the worker accepts (the
schema forbids extra fields). Fields without a default come first, as faust requires; JSON is read by
name, so the order does not matter on the wire. The records check no constraints (ids' pattern, seq >=
0, exactly one payload): the pydantic models do, and `tests/test_faust_records.py` keeps the two in step.
"""

from __future__ import annotations

import faust

from processor.events import Role, VerdictKind


class TokenEvent(faust.Record, serializer="json", include_metadata=False):
    """One chunk of a conversation's stream; send it keyed by `conversation_id` (raw key bytes)."""

    conversation_id: str
    seq: int
    role: Role
    token_ids: list[int] | None = None
    text: str | None = None
    end_of_turn: bool = False
    end_of_conversation: bool = False
    ts: float | None = None


class TokenVerdict(faust.Record, serializer="json", include_metadata=False):
    """One listed token's labels; category is null when the risk level is Safe."""

    position: int
    token_id: int
    risk_level: str
    risk_prob: float
    category: str | None
    category_prob: float | None


class VerdictEvent(faust.Record, serializer="json", include_metadata=False):
    """A verdict from `guard.verdicts`; (conversation_id, seq, kind) identifies it across redeliveries."""

    conversation_id: str
    seq: int
    turn: int
    role: Role
    kind: VerdictKind
    risk_level: str | None
    risk_prob: float | None
    category: str | None
    category_prob: float | None
    model: str
    tokens: list[TokenVerdict] = []  # noqa: RUF012 (faust copies a mutable default per record)
    alert: bool = False
    alert_position: int | None = None
    latency_ms: float | None = None
    error: str | None = None
