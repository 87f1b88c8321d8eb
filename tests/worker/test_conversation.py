"""Planning a conversation's step: order, redelivery, gaps, context limit, closed conversations."""

from __future__ import annotations

from processor.model.labels import Policy
from processor.worker.conversation import Incoming, finish_conversation, plan_conversation
from processor.worker.events import TokenEvent
from processor.worker.session_store import Session
from processor.worker.template import TurnWriter
from processor.worker.verdicts import VerdictConfig

from .fakes import LABELS, SAFE, chunk, on_the_wire

RAW = TurnWriter("raw", None, None)
CONFIG = VerdictConfig(LABELS, Policy.STRICT, "tokens", "tiny")


def incoming(seq, ids, **flags):
    return Incoming(
        TokenEvent(conversation_id="c", seq=seq, role="assistant", token_ids=ids, **flags), sent_at=None
    )


def finish(step):
    result = (
        chunk(step.token_ids, [SAFE] * len(step.token_ids), start=step.session.length)
        if step.token_ids
        else None
    )
    return finish_conversation(step, result, CONFIG, now=0.0)


def test_events_ordered_by_seq_and_redeliveries_dropped():
    session = Session("c", stored=True, next_seq=2, length=5)
    step = plan_conversation(session, [incoming(3, [7]), incoming(1, [9]), incoming(2, [6])], RAW, 100)
    assert step.token_ids == [6, 7] and step.duplicates == 1 and step.next_seq == 4
    outcome = finish(step)
    assert outcome.session.length == 7 and outcome.session.next_seq == 4
    assert [v.tokens[0].position for v in on_the_wire(outcome.verdicts)] == [5, 6]


def test_gap_is_reported_and_moderation_goes_on():
    step = plan_conversation(Session("c"), [incoming(0, [1]), incoming(3, [2])], RAW, 100)
    outcome = finish(step)
    assert [v.kind for v in on_the_wire(outcome.verdicts)] == ["tokens", "error", "tokens"]
    assert "events 1..2 never arrived" in on_the_wire(outcome.verdicts)[1].error


def test_context_limit_closes_the_conversation_and_later_events_are_rejected():
    step = plan_conversation(
        Session("c", stored=True, next_seq=1, length=8), [incoming(1, [1, 2]), incoming(2, [3])], RAW, 9
    )
    assert step.token_ids == [] and step.status == "error"
    assert len(step.rejected) == 1 and "is error" in step.rejected[0][1]
    outcome = finish(step)
    assert [v.kind for v in on_the_wire(outcome.verdicts)] == [
        "error"
    ] and "context of 9 tokens" in on_the_wire(outcome.verdicts)[0].error
    assert outcome.closed and outcome.session.length == 8


def test_end_of_conversation_closes():
    outcome = finish(plan_conversation(Session("c"), [incoming(0, [1], end_of_conversation=True)], RAW, 100))
    assert outcome.closed and outcome.session.status == "ended"
    assert [v.kind for v in on_the_wire(outcome.verdicts)] == ["tokens", "turn_end", "conversation_end"]


def test_the_session_after_a_step_keeps_what_the_step_does_not_change():
    """finish_conversation builds the next session field by field: a field it does not name (one added
    to Session later) would fall back to its default here."""
    before = Session("c", stored=True, next_seq=1, length=5, owner="worker-7", updated=12.5)
    after = finish(plan_conversation(before, [incoming(1, [4, 2])], RAW, 100)).session
    changed = {"next_seq": 2, "length": 7, "turns": after.turns, "verdicts": after.verdicts}
    for name in Session._fields:
        expected = changed.get(name, getattr(before, name))
        assert getattr(after, name) == expected, name
    assert list(Session._fields) == [
        "conversation_id", "stored", "next_seq", "length", "status", "turns", "verdicts", "owner", "updated"
    ], "a new Session field: carry it in finish_conversation, then list it here"  # fmt: skip
