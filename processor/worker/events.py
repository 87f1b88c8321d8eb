"""The two event types on the wire (token events in, verdict events out) and the token-event decoder.

The pydantic models are the contract: `schemas/*.json` is generated from them (`python -m
processor.worker.schemas`) and a test keeps the files equal to the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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


# Verdicts are stdlib dataclasses validated and serialized by pydantic (VERDICT_EVENTS), not BaseModels:
# the worker builds tens of thousands a second, and a BaseModel's validating constructor cost ~10 us each
# where these cost ~1 us. Readers validate what they receive with `parse_verdict`.
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


def verdict_json(verdict: VerdictEvent) -> bytes:
    return VERDICT_EVENTS.dump_json(verdict)


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
    if value is None:
        raise BadTokenEvent("record has no value (tombstone)")
    if len(value) > limits.max_record_bytes:
        raise BadTokenEvent(f"record is {len(value)} bytes, the limit is {limits.max_record_bytes}")
    try:
        event = TokenEvent.model_validate_json(value)
    except ValidationError as error:
        raise BadTokenEvent(_describe_validation_error(error)) from None
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
    if event.token_ids is not None:
        if len(event.token_ids) > limits.max_tokens_per_event:
            raise BadTokenEvent(
                f"event has {len(event.token_ids)} token ids, the limit is {limits.max_tokens_per_event}; "
                "split it into several events"
            )
        if limits.vocab_size is not None:
            outside = [token_id for token_id in event.token_ids if not 0 <= token_id < limits.vocab_size]
            if outside:
                raise BadTokenEvent(
                    f"token ids outside the model's vocabulary (0..{limits.vocab_size - 1}): {outside[:5]}"
                )
        control = limits.control_ids and [i for i in event.token_ids if i in limits.control_ids]
        if control:
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
