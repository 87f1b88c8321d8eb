"""A session's Redis hash reads back as the session written (pure: no Redis here; the integration
tests cover the store against a real one)."""

from __future__ import annotations

import pytest

from processor.worker.session_store import Session, _hash_fields, session_from_hash
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
