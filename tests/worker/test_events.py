"""Token-event decoding: every kind of bad record is refused with a reason; schemas match the models."""

from __future__ import annotations

import json

import pytest

from processor import schemas
from processor.events import BadTokenEvent, EventLimits, decode_token_event, decode_token_events

LIMITS = EventLimits(
    max_tokens_per_event=4, max_text_chars=10, max_conversation_id_length=12, vocab_size=1000
)


def record(**fields):
    event = {"conversation_id": "conv-1", "seq": 0, "role": "user", "token_ids": [1, 2]} | fields
    return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()


def test_valid_event():
    event = decode_token_event(b"conv-1", record(end_of_turn=True, ts=1.5), LIMITS)
    assert event.token_ids == [1, 2] and event.end_of_turn and event.ts == 1.5 and event.closes_turn


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"conv-1", b"not json", "Invalid JSON"),
        (b"conv-1", None, "tombstone"),
        (b"conv-1", record(seq=-1), "seq"),
        (b"conv-1", record(role="system"), "role"),
        (b"conv-1", record(extra=1), "extra"),
        (b"conv-1", record(seq=...), "seq: Field required"),
        (b"conv-1", record(text="hi"), "exactly one of token_ids and text"),
        (b"conv-1", record(token_ids=...), "exactly one of token_ids and text"),
        (b"conv-1", record(token_ids=[1, 2, 3, 4, 5]), "5 token ids, the limit is 4"),
        (b"conv-1", record(token_ids=[1, 1000]), "outside the model's vocabulary"),
        (b"conv-1", record(token_ids=[-1]), "outside the model's vocabulary"),
        (b"conv-1", record(token_ids=..., text="x" * 11), "text is 11 characters"),
        (b"other", record(), "differs from conversation_id"),
        (None, record(), "no key"),
        (b"a b", record(conversation_id="a b"), "conversation_id"),
        (b"c" * 13, record(conversation_id="c" * 13), "13 characters, the limit is 12"),
        (b"conv-1", b"x" * 2_000_000, "bytes, the limit"),
        (b"conv-1", b"[1, 2]", "valid token event"),
    ],
)
def test_bad_records_say_why(key, value, reason):
    with pytest.raises(BadTokenEvent) as caught:
        decode_token_event(key, value, LIMITS)
    assert reason in caught.value.reason


BAD_RECORDS = [
    (b"conv-1", b"not json"),
    (b"conv-1", None),
    (b"conv-1", record(token_ids=[1, 1000])),
    (b"other", record()),
    (None, record()),
    (b"conv-1", b"x" * 2_000_000),
]


def outcome(decoded):
    return decoded.reason if isinstance(decoded, BadTokenEvent) else decoded


@pytest.mark.parametrize("bad", [None, *BAD_RECORDS])
def test_a_batch_decodes_as_its_records_one_by_one(bad):
    """Decoding many records at once is the per-record decoding: same events, same reasons, in order."""
    good = [(b"conv-1", record(seq=seq)) for seq in range(5)]
    batch = good[:2] + ([bad] if bad else []) + good[2:]
    expected = []
    for key, value in batch:
        try:
            expected.append(decode_token_event(key, value, LIMITS))
        except BadTokenEvent as error:
            expected.append(error.reason)
    assert [outcome(decoded) for decoded in decode_token_events(batch, LIMITS)] == expected


def test_records_of_a_batch_cannot_join_into_one_event():
    """Two halves of an event, each not JSON: parsed together they must not make a valid event."""
    whole = record(seq=7)
    cut = whole.index(b'"role"')
    halves = [(b"conv-1", whole[:cut]), (b"conv-1", whole[cut:])]
    decoded = decode_token_events([(b"conv-1", record(seq=6)), *halves], LIMITS)
    assert outcome(decoded[0]).seq == 6
    assert all(
        outcome(item).startswith("not a valid token event: record: Invalid JSON") for item in decoded[1:]
    )


def test_text_without_tokenizer_refused():
    limits = EventLimits(text_allowed=False)
    with pytest.raises(BadTokenEvent, match="no tokenizer"):
        decode_token_event(b"conv-1", record(token_ids=..., text="hello"), limits)


def test_schema_files_are_current():
    for file_name, model in schemas.SCHEMA_FILES.items():
        on_disk = (schemas.SCHEMA_DIR / file_name).read_text()
        assert on_disk == schemas.render_schema(model), f"run `python -m processor.schemas` ({file_name})"


def test_turn_control_ids_refused_where_the_worker_writes_the_template():
    chat = EventLimits(vocab_size=1000, control_ids=frozenset({900, 901}))
    with pytest.raises(BadTokenEvent, match=r"token ids \[901\] open or close chat turns"):
        decode_token_event(b"conv-1", record(token_ids=[1, 901]), chat)
    # Raw mode (no control ids): the same ids are fed as sent.
    assert decode_token_event(
        b"conv-1", record(token_ids=[1, 901]), EventLimits(vocab_size=1000)
    ).token_ids == [
        1,
        901,
    ]
