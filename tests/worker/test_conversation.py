"""Planning a conversation's step: order, redelivery, gaps, context limit, closed conversations."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.events import TokenEvent
from processor.model.labels import Policy
from processor.worker.conversation import Incoming, finish_conversation, plan_conversation
from processor.worker.session_store import Session
from processor.worker.template import TurnWriter
from processor.worker.text import IncrementalTokenizer
from processor.worker.verdicts import VerdictConfig

from .fakes import CONTROVERSIAL, LABELS, SAFE, UNSAFE, chunk, on_the_wire

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


WORDS = st.sampled_from(["Tell", " me", " a", " joke", "!", " Why", " did", "n't", " 42", "\n", " ", "é"])
TURN = st.tuples(
    st.lists(WORDS, min_size=1, max_size=6),  # the turn's text
    st.lists(st.integers(0, 30), max_size=3),  # where it is split into events
    st.booleans(),  # whether its last event says end_of_turn (else the next turn's first event closes it)
)


def text_events(turns: list[tuple[list[str], list[int], bool]]) -> list[TokenEvent]:
    """Alternating user and assistant turns as text events, then an empty end_of_conversation."""
    events: list[TokenEvent] = []
    for index, (words, cuts, closed) in enumerate(turns):
        role, text = ("user" if index % 2 == 0 else "assistant"), "".join(words)
        bounds = [0, *sorted({min(cut, len(text)) for cut in cuts}), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        for k, piece in enumerate(pieces):
            end = closed and k == len(pieces) - 1
            events.append(
                TokenEvent(conversation_id="c", seq=len(events), role=role, text=piece, end_of_turn=end)
            )
    events.append(
        TokenEvent(conversation_id="c", seq=len(events), role="user", text="", end_of_conversation=True)
    )
    return events


def templated_turn(tokenizer, role: str, content: str) -> tuple[list[int], list[int]]:
    """One turn as apply_chat_template(enable_thinking=False) tokenizes it in a conversation (an
    assistant turn as the newest message after a user turn), and the indexes of its ids whose text
    overlaps the content's (a newline the content merged into the opener's counts as content)."""
    user = [{"role": "user", "content": "q"}]
    before = (
        tokenizer.apply_chat_template(user, tokenize=False, enable_thinking=False)
        if role == "assistant"
        else ""
    )
    messages = (
        [*user, {"role": role, "content": content}]
        if role == "assistant"
        else [{"role": role, "content": content}]
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)[len(before) :]
    shown = content.lstrip("\n") if role == "assistant" else content  # the template's lstrip
    end = len(text) - len("<|im_end|>\n")
    start = end - len(shown)
    assert text[start:end] == shown
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    content_at = [k for k, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    return list(encoded["input_ids"]), content_at


def levels(start: int, count: int, every: int, flagged: int) -> list[int]:
    """Labels that tell the heads apart: `flagged` at the positions divisible by `every`."""
    return [flagged if (start + k) % every == 0 else SAFE for k in range(count)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(TURN, min_size=1, max_size=4), step_sizes=st.lists(st.integers(1, 4), min_size=1))
def test_streamed_text_turns_are_fed_and_answered_as_the_whole_conversation(
    qwen3_tokenizer, special_ids, turns, step_sizes
):
    """Text turns split at random points, closed by end_of_turn or (left off) by the next turn's first
    event, in steps of random sizes: the model is fed exactly the whole conversation's chat template;
    every content token is listed once, read from its own turn's heads (user: query, assistant:
    response), in a verdict whose role is that of the content it lists last (its event's own, when the
    event fed any)."""
    writer = TurnWriter("chat", special_ids, IncrementalTokenizer(qwen3_tokenizer))
    expected_ids: list[int] = []
    role_at: dict[int, str] = {}  # content position -> its turn's role, from the template's layout
    for index, (words, _, _) in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        ids, content_at = templated_turn(qwen3_tokenizer, role, "".join(words))
        role_at |= {len(expected_ids) + k: role for k in content_at}
        expected_ids += ids
    events = text_events(turns)
    session, fed, listed, sizes = Session("c"), [], {}, itertools.cycle(step_sizes)
    while events:
        size = next(sizes)
        step = plan_conversation(session, [Incoming(event, None) for event in events[:size]], writer, 10_000)
        events = events[size:]
        start, count = session.length, len(step.token_ids)
        result = chunk(
            step.token_ids, levels(start, count, 3, UNSAFE), levels(start, count, 2, CONTROVERSIAL), start
        )
        outcome = finish_conversation(step, result, CONFIG, now=0.0)
        fed += step.token_ids
        session = outcome.session
        for verdict in on_the_wire(outcome.verdicts):
            if verdict.kind == "tokens":
                # the role of the last content it lists: its event's own, unless all of that is held
                # back (text that may still merge with the next) or it has none (flags only)
                positions = [token.position for token in verdict.tokens]
                assert positions == sorted(positions) and verdict.role == role_at[positions[-1]]
                for token in verdict.tokens:
                    assert token.position not in listed, "a token listed twice"
                    listed[token.position] = token.risk_level
    assert fed == expected_ids
    assert listed.keys() == role_at.keys()
    heads = {"user": (2, "Controversial"), "assistant": (3, "Unsafe")}  # levels() of each role's heads
    for position, role in role_at.items():
        every, flagged = heads[role]
        assert listed[position] == (flagged if position % every == 0 else "Safe"), (position, role)
