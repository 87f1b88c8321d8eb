"""The chat template the worker inserts equals the tokenizer's own rendering."""

from __future__ import annotations

import pytest

from processor.events import TokenEvent
from processor.worker.template import TurnState, TurnWriter, render_conversation
from processor.worker.text import IncrementalTokenizer


def chat_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def event(seq, role, **fields):
    return TokenEvent(conversation_id="c", seq=seq, role=role, **fields)


def stream(writer, events):
    state, fed_all = TurnState(), []
    for item in events:
        state, fed = writer.feed(state, item)
        fed_all.append(fed)
    return state, fed_all


@pytest.fixture(scope="module")
def writer(qwen3_tokenizer, special_ids):
    return TurnWriter("chat", special_ids, IncrementalTokenizer(qwen3_tokenizer))


def test_streamed_exchange_equals_apply_chat_template(writer, qwen3_tokenizer):
    user, assistant = "How do I bake bread?", "Mix flour,\nwater and yeast; then wait."
    user_ids = qwen3_tokenizer.encode(user)
    assistant_ids = qwen3_tokenizer.encode(assistant)
    events = [
        event(0, "user", token_ids=user_ids[:3]),
        event(1, "user", token_ids=user_ids[3:], end_of_turn=True),
    ]
    events += [event(2 + i, "assistant", token_ids=[token]) for i, token in enumerate(assistant_ids)]
    events.append(event(99, "assistant", token_ids=[], end_of_conversation=True))
    state, fed = stream(writer, events)
    ids = [token for chunk in fed for token in chunk.token_ids]
    expected = chat_ids(
        qwen3_tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    )
    assert ids == expected
    assert state.open_role is None and state.turn == 1
    # content flags pick out exactly the content ids, in order
    content = [
        t for chunk in fed for t, is_content in zip(chunk.token_ids, chunk.content, strict=True) if is_content
    ]
    assert content == user_ids + assistant_ids


def test_open_user_turn_closed_by_assistant_text(writer, qwen3_tokenizer, special_ids):
    user, assistant = "Tell me a joke", "Why did the chicken cross the road?"
    events = [event(0, "user", text="Tell me "), event(1, "user", text="a joke")]
    events += [
        event(2, "assistant", text=assistant[:10]),
        event(3, "assistant", text=assistant[10:], end_of_turn=True),
    ]
    _, fed = stream(writer, events)
    ids = [token for chunk in fed for token in chunk.token_ids]
    expected = chat_ids(
        qwen3_tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    )
    assert ids == expected
    closing = fed[2].closed_turns
    assert len(closing) == 1 and closing[0].role == "user" and not closing[0].explicit
    assert fed[2].token_ids[closing[0].prompt_index] == special_ids.im_end
    assert fed[2].roles[closing[0].prompt_index] == "user"


def test_multi_turn_matches_per_exchange_rendering(writer, qwen3_tokenizer, special_ids):
    turns = [("user", "hi"), ("assistant", "hello!"), ("user", "bye"), ("assistant", "see you")]
    events = [event(i, role, text=text, end_of_turn=True) for i, (role, text) in enumerate(turns)]
    _, fed = stream(writer, events)
    ids = [token for chunk in fed for token in chunk.token_ids]
    # Each assistant turn is rendered as the newest message at the time it streams.
    expected = []
    for user, assistant in ((turns[0], turns[1]), (turns[2], turns[3])):
        pair = [{"role": user[0], "content": user[1]}, {"role": assistant[0], "content": assistant[1]}]
        expected += chat_ids(qwen3_tokenizer, pair)
    assert ids == expected
    content = [(role, qwen3_tokenizer.encode(text)) for role, text in turns]
    assert render_conversation(content, special_ids) == expected
    assert [chunk.turns[0] for chunk in fed] == [0, 1, 2, 3]


def test_user_only_conversation(writer, qwen3_tokenizer):
    _, fed = stream(writer, [event(0, "user", text="Is this safe?", end_of_conversation=True)])
    assert fed[0].token_ids == chat_ids(qwen3_tokenizer, [{"role": "user", "content": "Is this safe?"}])
    assert [turn.explicit for turn in fed[0].closed_turns] == [True]


def test_flags_only_event_opens_no_turn(writer):
    state, fed = stream(writer, [event(0, "assistant", token_ids=[], end_of_turn=True)])
    assert fed[0].token_ids == [] and state.turn == -1


def test_raw_mode_feeds_ids_as_sent(special_ids):
    raw = TurnWriter("raw", special_ids, None)
    state, fed = stream(
        raw,
        [event(0, "user", token_ids=[1, 2, 3], end_of_turn=True), event(1, "assistant", token_ids=[4, 5])],
    )
    assert fed[0].token_ids == [1, 2, 3] and fed[0].content == [True] * 3
    assert fed[0].closed_turns[0].prompt_index == 2  # the user turn's last token
    assert fed[1].token_ids == [4, 5] and fed[1].turns == [1, 1]
    assert state.open_role == "assistant"


@pytest.mark.parametrize(
    ("user", "assistant"),
    [
        ("\nhi", "\n\nok"),  # "\n" + "\n" is one id in the template's string
        (" \n x", "\r\nok\n"),
        ("\n", "\n"),  # only newlines: the assistant's are dropped (the template's lstrip)
        ("hi\n\n", "  \nz"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_text_opening_with_newlines_is_tokenized_with_the_opener(
    writer, qwen3_tokenizer, special_ids, user, assistant, split
):
    def pieces(text):
        return list(text) if split else [text]

    events = [event(k, "user", text=piece) for k, piece in enumerate(pieces(user))]
    events += [event(50 + k, "assistant", text=piece) for k, piece in enumerate(pieces(assistant))]
    events.append(event(99, "assistant", text="", end_of_turn=True))
    _, fed = stream(writer, events)
    ids = [token for chunk in fed for token in chunk.token_ids]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    assert ids == chat_ids(qwen3_tokenizer, messages)
    # The opener's newline is content only where content merged into it.
    flags = [flag for chunk in fed for flag in chunk.content]
    merged_user = ids[2] != special_ids.newline
    assert flags[2] == merged_user
