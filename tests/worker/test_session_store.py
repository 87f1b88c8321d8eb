"""A session's Redis hash reads back as the session written; a step writes only the fields it moved,
and the hash a real Redis then holds is the one a full write would leave."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from processor.worker.session_store import (
    Session,
    SessionStore,
    SessionUpdate,
    _hash_fields,
    session_from_hash,
)
from processor.worker.template import TurnState
from processor.worker.verdicts import Flag, VerdictState


def as_redis_hash(fields: list[str]) -> dict[bytes, bytes]:
    return {fields[k].encode(): fields[k + 1].encode() for k in range(0, len(fields), 2)}


@pytest.mark.parametrize(
    "turns",
    [
        TurnState(),
        TurnState(turn=2, open_role="assistant", text_tail="\n\n", opener_in_tail=True),
        TurnState(turn=0, open_role="user", text_tail=" wor", opener_in_tail=False),
    ],
)
def test_session_round_trips_through_its_hash(turns):
    flag = Flag("Unsafe", 0.75, "Violent", 0.5)
    session = Session(
        "c-1",
        stored=True,
        next_seq=7,
        length=42,
        turns=turns,
        verdicts=VerdictState(2, True, "Unsafe", 30, flag, flag, 30),
        owner="w-1",
        updated=1764300000.25,
    )
    fields = as_redis_hash(_hash_fields(session, "w-1", "1764300000.25"))
    assert session_from_hash("c-1", fields) == session


def test_a_hash_from_before_the_opener_field_reads_as_opener_fed():
    """Workers before `opener_in_tail` fed a turn's whole opener at once: nothing of it is in the tail."""
    session = Session("c-1", stored=True, turns=TurnState(turn=0, open_role="user", text_tail="hi"))
    fields = as_redis_hash(_hash_fields(session, "", "0.0"))
    del fields[b"opener_in_tail"]
    assert session_from_hash("c-1", fields).turns == TurnState(turn=0, open_role="user", text_tail="hi")


def test_a_step_writes_the_fields_it_moved_and_who_wrote_it_when():
    before = Session("c-1", stored=True, next_seq=3, length=40, turns=TurnState(1, "assistant"), owner="w-1")
    streaming = before._replace(next_seq=4, length=41)
    assert _hash_fields(streaming, "w-1", "1.5", stored=before)[::2] == [
        "owner",
        "updated",
        "next_seq",
        "length",
    ]
    debounced = streaming._replace(verdicts=VerdictState(1, True, "Safe"))
    assert _hash_fields(debounced, "w-1", "1.5", stored=streaming)[::2] == [
        "owner",
        "updated",
        "verdict_state",
    ]


@pytest.mark.integration
async def test_every_write_leaves_the_hash_a_full_write_would(redis_url, redis_prefix):
    """The write applies only on top of the session it started from (its next_seq is checked), so the
    fields it leaves out hold their values: after each step of a conversation's life the hash is
    field for field the one the whole session would write."""
    flag = Flag("Unsafe", 0.75, "Violent", 0.5)
    user = Session("c-1", next_seq=1, length=5, turns=TurnState(0, "user", "hi", True))
    lives = [
        user,
        user._replace(next_seq=2, length=9, turns=TurnState(1, "assistant"), verdicts=VerdictState(1, True)),
        user._replace(next_seq=3, length=10, turns=TurnState(1, "assistant"), verdicts=VerdictState(1, True)),
        user._replace(
            next_seq=4,
            length=11,
            turns=TurnState(1, "assistant"),
            verdicts=VerdictState(1, True, "Unsafe", 10, flag, flag, 10),
        ),
        user._replace(
            next_seq=5,
            length=11,
            status="ended",
            turns=TurnState(2),
            verdicts=VerdictState(1, True, "Unsafe", 10, flag, flag, 10),
        ),
    ]
    redis = Redis.from_url(redis_url)
    try:
        store = SessionStore(redis, redis_prefix, 60, 30, "w-2")
        before = Session("c-1")
        for after in lives:
            fed = [7] * (after.length - before.length)
            assert await store.save([SessionUpdate(before, after, fed)]) == []
            stored = await redis.hgetall(store.session_key("c-1"))
            full = as_redis_hash(_hash_fields(after, "w-2", stored[b"updated"].decode()))
            assert stored == full
            assert session_from_hash("c-1", stored) == after._replace(
                stored=True, owner="w-2", updated=float(stored[b"updated"])
            )
            before = after._replace(stored=True)
    finally:
        await redis.aclose()
