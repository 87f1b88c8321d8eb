"""One conversation's share of a step, before and after the engine runs: pure, no Kafka, no Redis.

`plan_conversation` orders the conversation's events by seq, drops the ones already applied (a
redelivery after a crash: seq below the session's next_seq), notes seq gaps, stops at the model's
context, and turns the rest into one chunk of token ids for the engine. `finish_conversation` turns the
engine's labels into verdicts and the session as it ends the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from processor.engine.results import ChunkResult, ChunkStatus, HeadLabels
from processor.events import TokenEvent, Verdict
from processor.worker.session_store import Session, SessionStatus
from processor.worker.template import FedTokens, TurnState, TurnWriter
from processor.worker.verdicts import VerdictConfig, build_verdicts, error_verdict, latency_ms


# Not frozen: these are built per token event, and a frozen dataclass's __init__ costs ~2x.
@dataclass(slots=True)
class Incoming:
    """A decoded token event and where it came from (the Kafka record, opaque here)."""

    event: TokenEvent
    sent_at: float | None  # the event's ts, else the record's timestamp
    source: Any = None


@dataclass(slots=True)
class PlannedEvent:
    incoming: Incoming
    fed: FedTokens
    offset: int  # where its fed tokens start in the step's chunk
    gap_error: str | None = None  # published before its verdicts; moderation goes on
    closing_error: str | None = None  # nothing fed; the conversation is closed


@dataclass(slots=True)
class ConversationStep:
    session: Session
    planned: list[PlannedEvent] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    turns: TurnState = field(default_factory=TurnState)
    next_seq: int = 0
    status: SessionStatus = "active"
    duplicates: int = 0  # events already applied (redelivered)
    rejected: list[tuple[Incoming, str]] = field(default_factory=list)  # for the DLQ

    @property
    def conversation_id(self) -> str:
        return self.session.conversation_id

    @property
    def changed(self) -> bool:
        return bool(self.planned)


class ConversationOutcome(NamedTuple):  # one per conversation a step: a tuple is ~3x cheaper to make
    before: Session  # as the step found it in Redis
    session: Session  # as the step leaves it
    verdicts: list[Verdict]
    fed_token_ids: list[int]  # appended to the Redis history

    @property
    def closed(self) -> bool:
        return self.session.closed


def plan_conversation(
    session: Session, incoming: list[Incoming], writer: TurnWriter, max_positions: int
) -> ConversationStep:
    step = ConversationStep(session, turns=session.turns, next_seq=session.next_seq, status=session.status)
    for item in sorted(incoming, key=lambda item: item.event.seq):
        event = item.event
        if event.seq < step.next_seq:
            step.duplicates += 1
            continue
        if step.status != "active":
            step.rejected.append(
                (
                    item,
                    f"conversation {event.conversation_id!r} is {step.status}; start a new conversation id",
                )
            )
            continue
        gap_error = None
        if event.seq > step.next_seq:
            gap_error = (
                f"seq gap: events {step.next_seq}..{event.seq - 1} never arrived; moderation continues"
            )
        turns, fed = writer.feed(step.turns, event)
        step.next_seq = event.seq + 1
        if session.length + len(step.token_ids) + len(fed) > max_positions:
            closing_error = (
                f"conversation passed the model's context of {max_positions} tokens; it is closed, "
                "start a new conversation id"
            )
            step.planned.append(
                PlannedEvent(item, FedTokens(), len(step.token_ids), gap_error, closing_error)
            )
            step.status = "error"
            continue
        step.planned.append(PlannedEvent(item, fed, len(step.token_ids), gap_error))
        step.token_ids.extend(fed.token_ids)
        step.turns = turns
        if event.end_of_conversation:
            step.status = "ended"
    return step


def finish_conversation(
    step: ConversationStep, result: ChunkResult | None, config: VerdictConfig, now: float
) -> ConversationOutcome:
    session = step.session
    if result is None:
        result = empty_result(session.conversation_id, session.length)
    if result.status is not ChunkStatus.OK:
        return refused(step, _REFUSALS[result.status], config, now)
    verdict_state = session.verdicts
    verdicts: list[Verdict] = []
    for planned in step.planned:
        event = planned.incoming.event
        latency = latency_ms(planned.incoming.sent_at, now)
        if planned.gap_error:
            verdicts.append(error_verdict(event, verdict_state.turn, planned.gap_error, config, latency))
        if planned.closing_error:
            verdicts.append(error_verdict(event, verdict_state.turn, planned.closing_error, config, latency))
            continue
        verdict_state, event_verdicts = build_verdicts(
            verdict_state, event, planned.fed, result, planned.offset, config, latency
        )
        verdicts.extend(event_verdicts)
    # Built field by field: _replace costs ~1 us more, once per conversation a step.
    after = Session(
        session.conversation_id,
        session.stored,
        step.next_seq,
        session.length + len(step.token_ids),
        step.status,
        step.turns,
        verdict_state,
        session.owner,
        session.updated,
    )
    return ConversationOutcome(session, after, verdicts, step.token_ids)


_REFUSALS = {
    ChunkStatus.CONTEXT_EXCEEDED: (
        "conversation passed the model's context; it is closed, start a new conversation id"
    ),
    ChunkStatus.EXCEEDS_CACHE: (
        "conversation needs more KV cache than the worker has (raise --kv-cache-bytes); it is closed"
    ),
}


def refused(step: ConversationStep, message: str, config: VerdictConfig, now: float) -> ConversationOutcome:
    """The engine did not run the chunk: nothing was fed, the conversation closes with an error verdict."""
    first = step.planned[0]
    latency = latency_ms(first.incoming.sent_at, now)
    verdict = error_verdict(first.incoming.event, step.session.verdicts.turn, message, config, latency)
    after = step.session._replace(next_seq=step.next_seq, status="error")
    return ConversationOutcome(step.session, after, [verdict], [])


def empty_result(conversation_id: str, start_position: int) -> ChunkResult:
    no_labels = HeadLabels(risk_level=[], risk_prob=[], category=[], category_prob=[])
    return ChunkResult(
        conversation_id=conversation_id,
        request_id=-1,
        start_position=start_position,
        token_ids=[],
        response=no_labels,
        query=no_labels,
    )
