"""The wire schema: token events in, verdict events out, their default topics, and their decoding.

Neutral ground for everything that speaks to the topics (the worker, the client, a gateway). The
pydantic models are the contract: `schemas/*.json` is generated from them (`python -m processor.schemas`)
and a test keeps the files equal to the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, Json, TypeAdapter, ValidationError, model_validator

DEFAULT_TOKENS_TOPIC = "guard.tokens"
DEFAULT_VERDICTS_TOPIC = "guard.verdicts"

Role = Literal["user", "assistant"]
VerdictKind = Literal["tokens", "prompt", "turn_end", "conversation_end", "error"]

# Hard ceilings of the wire format; a worker may enforce lower limits (EventLimits).
CONVERSATION_ID_MAX_LENGTH = 256
# Conversation ids end up in Redis keys and log lines: keep them to a safe printable set.
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9._:@+=/-]+$"


class TokenEvent(BaseModel):
    """One chunk of a conversation's stream, as a producer (LLM gateway) sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conversation_id: str = Field(
        min_length=1,
        max_length=CONVERSATION_ID_MAX_LENGTH,
        pattern=CONVERSATION_ID_PATTERN,
        description="Also the Kafka record key, so that a conversation stays in one partition.",
    )
    seq: int = Field(ge=0, description="The conversation's event counter, from 0, without gaps.")
    role: Role = Field(description="Whose turn these tokens belong to; user turns read the query heads.")
    token_ids: list[int] | None = Field(
        default=None, description="Token ids in the model's vocabulary. Exactly one of token_ids and text."
    )
    text: str | None = Field(
        default=None,
        description="Text, tokenized by the worker incrementally. Exactly one of token_ids and text.",
    )
    end_of_turn: bool = False
    end_of_conversation: bool = Field(default=False, description="Implies end_of_turn.")
    ts: float | None = Field(default=None, description="Producer's send time, unix seconds.")

    @model_validator(mode="after")
    def _exactly_one_payload(self) -> TokenEvent:
        if (self.token_ids is None) == (self.text is None):
            raise ValueError("exactly one of token_ids and text must be given (either may be empty)")
        return self

    @property
    def closes_turn(self) -> bool:
        return self.end_of_turn or self.end_of_conversation


# The verdict contract is these stdlib dataclasses, validated and serialized by pydantic (VERDICT_EVENTS):
# they make the schema and are what readers get from `parse_verdict`. The worker itself builds tens of
# thousands a second and writes them as plain dicts of the same fields (`Verdict`, see
# processor/worker/verdicts.py), serialized by orjson: a dict and orjson skip the dataclass construction
# and pydantic's serializer, several times cheaper a verdict. Tests validate what the worker builds
# against VERDICT_EVENTS.
@dataclass(slots=True, kw_only=True)
class TokenVerdict:
    """One listed token's labels; category is null when the risk level is Safe."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    position: Annotated[
        int, Field(description="Index in the sequence the model saw, template tokens counted.")
    ]
    token_id: int
    risk_level: str
    risk_prob: float
    category: str | None
    category_prob: float | None


@dataclass(slots=True, kw_only=True)
class VerdictEvent:
    """What the worker publishes; (conversation_id, seq, kind) identifies a verdict across redeliveries."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    conversation_id: str
    seq: Annotated[int, Field(description="The token event this verdict answers.")]
    turn: Annotated[int, Field(description="Turn index in the conversation, from 0.")]
    role: Role
    kind: VerdictKind
    risk_level: Annotated[
        str | None, Field(description="Summary under the worker's policy; null for error verdicts.")
    ]
    risk_prob: float | None
    category: Annotated[str | None, Field(description="Null when risk_level is Safe.")]
    category_prob: float | None
    tokens: list[TokenVerdict] = dataclass_field(default_factory=list)
    alert: Annotated[
        bool,
        Field(description="First flag of the turn (two consecutive flagged tokens, or a flagged prompt)."),
    ] = False
    alert_position: int | None = None
    latency_ms: Annotated[float | None, Field(description="From the token event's ts to this verdict.")] = (
        None
    )
    model: str
    error: Annotated[str | None, Field(description="What went wrong, for kind=error.")] = None


VERDICT_EVENTS = TypeAdapter(VerdictEvent)

# A VerdictEvent as the worker builds it: a dict with exactly its fields, in its order.
Verdict = dict[str, Any]


def verdict_json(verdict: Verdict) -> bytes:
    return orjson.dumps(verdict)


def parse_verdict(value: bytes | str) -> VerdictEvent:
    """A verdict event as read from the verdicts topic; raises pydantic's ValidationError if it is not one."""
    return VERDICT_EVENTS.validate_json(value)


@dataclass(frozen=True)
class EventLimits:
    """Per-event limits a worker enforces; vocab_size None skips the id check (no model yet)."""

    max_record_bytes: int = 1_048_576
    max_tokens_per_event: int = 4096
    max_text_chars: int = 65_536
    max_conversation_id_length: int = 128
    vocab_size: int | None = None
    text_allowed: bool = True
    # Chat mode: the ids that open and close turns (<|im_start|>, <|im_end|>, <|endoftext|>). The worker
    # writes the template itself; such ids inside content would forge turns the model then reads.
    control_ids: frozenset[int] = frozenset()


class BadTokenEvent(ValueError):
    """A record that is not a valid token event; `reason` goes to the DLQ record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_token_event(key: bytes | None, value: bytes | None, limits: EventLimits) -> TokenEvent:
    """Parse and check one Kafka record; raises BadTokenEvent saying what is wrong with it."""
    _check_size(value, limits)
    try:
        event = TokenEvent.model_validate_json(value)  # type: ignore[arg-type]
    except ValidationError as error:
        raise BadTokenEvent(_describe_validation_error(error)) from None
    return _checked(event, key, limits)


# Every record of a batch parsed in one pydantic call, saving a call's fixed cost per record. Each value is
# parsed as a JSON document of its own (Json[...]), so no record can run into its neighbour.
_TOKEN_EVENT_BATCH = TypeAdapter(list[Json[TokenEvent]])


def decode_token_events(
    records: Sequence[tuple[bytes | None, bytes | None]], limits: EventLimits
) -> list[TokenEvent | BadTokenEvent]:
    """`decode_token_event` of each (key, value), the event or the BadTokenEvent saying why not.

    The batch is parsed at once when every record parses; a batch with a record that does not is
    parsed one record at a time, so that each bad one gets its own reason.
    """
    try:
        for _, value in records:
            _check_size(value, limits)
        events = _TOKEN_EVENT_BATCH.validate_python([value for _, value in records])
    except (BadTokenEvent, ValidationError):
        return [_decoded_or_error(key, value, limits) for key, value in records]
    decoded: list[TokenEvent | BadTokenEvent] = []
    for (key, _), event in zip(records, events, strict=True):
        try:
            decoded.append(_checked(event, key, limits))
        except BadTokenEvent as error:
            decoded.append(error)
    return decoded


def _decoded_or_error(
    key: bytes | None, value: bytes | None, limits: EventLimits
) -> TokenEvent | BadTokenEvent:
    try:
        return decode_token_event(key, value, limits)
    except BadTokenEvent as error:
        return error


def _check_size(value: bytes | None, limits: EventLimits) -> None:
    if value is None:
        raise BadTokenEvent("record has no value (tombstone)")
    if len(value) > limits.max_record_bytes:
        raise BadTokenEvent(f"record is {len(value)} bytes, the limit is {limits.max_record_bytes}")


def _checked(event: TokenEvent, key: bytes | None, limits: EventLimits) -> TokenEvent:
    _check_limits(event, limits)
    if key is None:
        raise BadTokenEvent("record has no key; the key must be the conversation_id")
    if key != event.conversation_id.encode():
        raise BadTokenEvent(f"record key {key[:80]!r} differs from conversation_id {event.conversation_id!r}")
    return event


def _check_limits(event: TokenEvent, limits: EventLimits) -> None:
    if len(event.conversation_id) > limits.max_conversation_id_length:
        raise BadTokenEvent(
            f"conversation_id is {len(event.conversation_id)} characters, "
            f"the limit is {limits.max_conversation_id_length}"
        )
    token_ids = event.token_ids
    if token_ids:
        if len(token_ids) > limits.max_tokens_per_event:
            raise BadTokenEvent(
                f"event has {len(token_ids)} token ids, the limit is {limits.max_tokens_per_event}; "
                "split it into several events"
            )
        vocab_size = limits.vocab_size
        if vocab_size is not None and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
            outside = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
            raise BadTokenEvent(
                f"token ids outside the model's vocabulary (0..{vocab_size - 1}): {outside[:5]}"
            )
        if limits.control_ids and not limits.control_ids.isdisjoint(token_ids):
            control = [token_id for token_id in token_ids if token_id in limits.control_ids]
            raise BadTokenEvent(
                f"token ids {control[:5]} open or close chat turns (<|im_start|>, <|im_end|>, "
                "<|endoftext|>); in chat mode send content ids only and mark a turn's end with end_of_turn"
            )
    if event.text is not None:
        if not limits.text_allowed:
            raise BadTokenEvent("event carries text but the worker's model has no tokenizer; send token_ids")
        if len(event.text) > limits.max_text_chars:
            raise BadTokenEvent(
                f"text is {len(event.text)} characters, the limit is {limits.max_text_chars}; "
                "split it into several events"
            )


def _describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "record"
        problems.append(f"{where}: {item['msg']}")
    return "not a valid token event: " + "; ".join(problems)
