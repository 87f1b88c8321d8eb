"""A session's Redis hash reads back as the session written; a step writes only the fields it moved,
and the hash a real Redis then holds is the one a full write would leave."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from processor.worker.session_store import (
    ReplicasBehind,
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


@pytest.fixture(params=["redis", "redis-cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis | RedisCluster]:
    """A client of the single test Redis, or of the test Redis Cluster."""
    if request.param == "redis-cluster":
        client: Redis | RedisCluster = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield client
    finally:
        await client.aclose()


def new_conversation(conversation_id: str, length: int) -> SessionUpdate:
    return SessionUpdate(
        Session(conversation_id), Session(conversation_id, next_seq=1, length=length), [7] * length
    )


@pytest.mark.integration
async def test_every_write_leaves_the_hash_a_full_write_would(redis, redis_prefix):
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


@pytest.mark.integration
async def test_a_step_across_hash_slots_writes_each_conversation_once(redis, redis_prefix):
    """A conversation's two keys share a slot; a step's conversations spread over many slots (a cluster
    writes them slot by slot) and each is applied, or reported moved on, by itself."""
    store = SessionStore(redis, redis_prefix, 60, 30, "w-1")
    ids = [f"c-{i}" for i in range(40)]
    assert all(
        key_slot(store.session_key(i).encode()) == key_slot(store.history_key(i).encode()) for i in ids
    )
    assert len({key_slot(store.session_key(i).encode()) for i in ids}) > 30
    first = [new_conversation(i, 3) for i in ids]
    assert await store.save(first) == []
    assert await store.save(first) == [], "a retried write is recognised as applied"
    loaded = await store.load_sessions(ids)
    # Another worker moves every third conversation on; this worker's step is then stale for those.
    moved = [SessionUpdate(loaded[i], loaded[i]._replace(next_seq=5), []) for i in ids[::3]]
    assert await store.save(moved) == []
    step = [SessionUpdate(loaded[i], loaded[i]._replace(next_seq=2, length=4), [8]) for i in ids]
    assert sorted(await store.save(step)) == sorted(ids[::3])
    for i in ids:
        moved_on = i in ids[::3]
        assert await store.load(i, 3 if moved_on else 4) == ([7] * 3 if moved_on else [7, 7, 7, 8])


@pytest.mark.integration
async def test_a_primary_without_the_script_loads_it_and_writes(redis, redis_prefix):
    """A new or promoted primary has an empty script cache."""
    store = SessionStore(redis, redis_prefix, 60, 30, "w-1")
    assert await store.save([new_conversation("a", 2), new_conversation("b", 2)]) == []
    await redis.script_flush()
    assert await store.save([new_conversation("c", 2), new_conversation("d", 2)]) == []
    assert [await store.load(i, 2) for i in "abcd"] == [[7, 7]] * 4


@pytest.mark.integration
async def test_waiting_for_a_replica(redis_cluster_url, redis_url, redis_prefix):
    """With wait_replicas the save returns once a replica holds the writes; where none can (a Redis
    without replicas) it raises after the timeout, and the write, already applied, is not applied again."""
    cluster = RedisCluster.from_url(redis_cluster_url)
    single = Redis.from_url(redis_url)
    try:
        store = SessionStore(cluster, redis_prefix, 60, 30, "w-1", wait_replicas=1, wait_timeout_ms=2000)
        assert await store.save([new_conversation(f"r-{i}", 2) for i in range(10)]) == []
        store = SessionStore(single, redis_prefix, 60, 30, "w-1", wait_replicas=1, wait_timeout_ms=50)
        update = new_conversation("alone", 2)
        with pytest.raises(ReplicasBehind, match="0 of 1 replicas"):
            await store.save([update])
        assert await store.load("alone", 2) == [7, 7]
        with pytest.raises(ReplicasBehind):
            await store.save([update])
        assert await store.load_sessions(["alone"]) == {
            "alone": (await store.load_sessions(["alone"]))["alone"]
        }
        assert await single.strlen(store.history_key("alone")) == 8, "applied once"
    finally:
        await cluster.aclose()
        await single.aclose()
