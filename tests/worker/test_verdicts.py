"""Verdicts from labels: per-token lists, summaries, debounced alerts, prompt verdicts, modes."""

from __future__ import annotations

import pytest

from processor.events import TokenEvent
from processor.model.labels import Policy
from processor.worker.template import TurnState, TurnWriter
from processor.worker.text import IncrementalTokenizer
from processor.worker.verdicts import VerdictConfig, VerdictState, build_verdicts, latency_ms

from .fakes import CONTROVERSIAL, LABELS, SAFE, UNSAFE, chunk, on_the_wire

LATENCY = latency_ms(sent_at=100.0, now=100.25)


def config(mode="tokens", policy=Policy.STRICT):
    return VerdictConfig(LABELS, policy, mode, "tiny")


def raw_event(seq, role, ids, **flags):
    return TokenEvent(conversation_id="c", seq=seq, role=role, token_ids=ids, **flags)


def run(events_levels, mode="tokens", policy=Policy.STRICT, query_levels=None):
    """Feeds raw-mode events whose tokens get the given response levels; returns all verdicts."""
    writer = TurnWriter("raw", None, None)
    turns, state, position, verdicts = TurnState(), VerdictState(), 0, []
    for seq, (role, levels, flags) in enumerate(events_levels):
        event = raw_event(seq, role, list(range(100 + position, 100 + position + len(levels))), **flags)
        turns, fed = writer.feed(turns, event)
        result = chunk(fed.token_ids, levels, query_levels or levels, start=position)
        state, new = build_verdicts(state, event, fed, result, 0, config(mode, policy), LATENCY)
        verdicts += on_the_wire(new)
        position += len(fed)
    return state, verdicts


def test_per_token_verdicts_and_null_category_when_safe():
    _, verdicts = run([("assistant", [SAFE, UNSAFE], {})])
    (verdict,) = verdicts
    assert verdict.kind == "tokens" and verdict.turn == 0 and verdict.latency_ms == 250.0
    assert [t.position for t in verdict.tokens] == [0, 1]
    assert verdict.tokens[0].risk_level == "Safe" and verdict.tokens[0].category is None
    assert verdict.tokens[0].category_prob is None
    assert (
        verdict.tokens[1].risk_level == "Unsafe"
        and verdict.tokens[1].category == "Sexual Content or Sexual Acts"
    )
    # one flagged token is not debounced yet
    assert verdict.risk_level == "Safe" and verdict.category is None and not verdict.alert


def test_debounced_alert_across_events_only_once_per_turn():
    _, verdicts = run(
        [
            ("assistant", [SAFE, UNSAFE], {}),
            ("assistant", [UNSAFE, SAFE], {}),  # tokens 1 and 2 flagged -> alert at position 2
            ("assistant", [UNSAFE, UNSAFE], {"end_of_turn": True}),  # flagged again: no second alert
        ]
    )
    tokens = [v for v in verdicts if v.kind == "tokens"]
    assert [v.alert for v in tokens] == [False, True, False]
    assert tokens[1].alert_position == 2 and tokens[1].risk_level == "Unsafe"
    assert tokens[1].category == "Suicide & Self-Harm"  # the category of token 2
    assert tokens[2].risk_level == "Unsafe" and tokens[2].alert_position is None
    turn_end = verdicts[-1]
    assert turn_end.kind == "turn_end" and turn_end.risk_level == "Unsafe" and turn_end.alert_position == 2


def test_debounce_restarts_each_turn():
    _, verdicts = run([("assistant", [SAFE, UNSAFE], {"end_of_turn": True}), ("assistant", [UNSAFE], {})])
    assert not any(v.alert for v in verdicts)


@pytest.mark.parametrize(("policy", "alerted"), [(Policy.STRICT, True), (Policy.LOOSE, False)])
def test_policy_decides_controversial(policy, alerted):
    _, verdicts = run([("assistant", [CONTROVERSIAL, CONTROVERSIAL], {})], policy=policy)
    assert verdicts[0].alert is alerted
    assert verdicts[0].tokens[0].risk_level == "Controversial"  # per-token labels stay as the model said


def test_prompt_verdict_reads_query_heads_at_turn_end():
    state, verdicts = run(
        [("user", [SAFE, SAFE, SAFE], {"end_of_turn": True})], query_levels=[SAFE, SAFE, UNSAFE]
    )
    kinds = [v.kind for v in verdicts]
    assert kinds == ["tokens", "prompt", "turn_end"]
    prompt = verdicts[1]
    assert (
        prompt.role == "user"
        and prompt.risk_level == "Unsafe"
        and prompt.alert
        and prompt.alert_position == 2
    )
    assert prompt.tokens[0].position == 2
    assert state.alert_position == 2 and state.conversation_flag.level == "Unsafe"


def test_modes_filter_what_is_published():
    events = [
        ("user", [SAFE], {"end_of_turn": True}),
        ("assistant", [SAFE], {}),
        ("assistant", [UNSAFE], {}),
        ("assistant", [UNSAFE], {}),  # alert
        ("assistant", [UNSAFE], {}),  # still flagged: no change
        ("assistant", [SAFE], {}),  # back to safe: a change
        ("assistant", [], {"end_of_conversation": True}),
    ]
    by_mode = {
        mode: [(v.seq, v.kind) for v in run(events, mode=mode)[1]] for mode in ("tokens", "changes", "turns")
    }
    assert by_mode["tokens"] == [
        (0, "tokens"),
        (0, "prompt"),
        (0, "turn_end"),
        (1, "tokens"),
        (2, "tokens"),
        (3, "tokens"),
        (4, "tokens"),
        (5, "tokens"),
        (6, "turn_end"),
        (6, "conversation_end"),
    ]
    assert by_mode["changes"] == [
        (0, "prompt"),
        (0, "turn_end"),
        (3, "tokens"),
        (5, "tokens"),
        (6, "turn_end"),
        (6, "conversation_end"),
    ]
    assert by_mode["turns"] == [
        (0, "prompt"),
        (0, "turn_end"),
        (3, "tokens"),
        (6, "turn_end"),
        (6, "conversation_end"),
    ]


def test_conversation_end_summarizes_first_alert():
    _, verdicts = run(
        [
            ("assistant", [UNSAFE, UNSAFE], {"end_of_turn": True}),
            ("user", [SAFE], {"end_of_conversation": True}),
        ]
    )
    end = verdicts[-1]
    assert end.kind == "conversation_end" and end.risk_level == "Unsafe" and end.alert_position == 1


def test_a_text_turn_closed_by_the_next_role_reads_its_tail_with_its_own_heads(qwen3_tokenizer, special_ids):
    """A user text turn left open holds back its tail (text.py); the assistant event that closes it
    feeds that tail first. Its verdict is the assistant's (turn, role, debounce), and the tail's
    tokens are read from the query heads, the assistant's from the response heads."""
    writer = TurnWriter("chat", special_ids, IncrementalTokenizer(qwen3_tokenizer))
    user = TokenEvent(conversation_id="c", seq=0, role="user", text="Tell me a joke")
    answer = TokenEvent(conversation_id="c", seq=1, role="assistant", text="Why did the chicken")
    turns, first = writer.feed(TurnState(), user)
    turns, fed = writer.feed(turns, answer)
    tail, own = fed.content_spans  # the precondition: the user's tail rides with the answer
    assert (tail[2:4], own[2:4]) == (("user", 0), ("assistant", 1))
    n = len(fed)
    result = chunk(fed.token_ids, [UNSAFE] * n, [SAFE] * n, start=len(first))
    _, verdicts = build_verdicts(VerdictState(turn=0), answer, fed, result, 0, config(), LATENCY)
    prompt, tokens = on_the_wire(verdicts)
    assert prompt.kind == "prompt" and prompt.role == "user" and prompt.turn == 0
    assert tokens.kind == "tokens" and (tokens.role, tokens.turn) == ("assistant", 1)
    listed = {t.position - len(first): t.risk_level for t in tokens.tokens}
    assert listed == {k: "Safe" for k in range(*tail[:2])} | {k: "Unsafe" for k in range(*own[:2])}
    # the debounce counts the assistant's own tokens only: two flagged ones raise the alert
    assert tokens.alert and tokens.alert_position == len(first) + own[0] + 1
