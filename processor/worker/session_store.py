"""Conversation sessions in Redis: one hash of metadata and one compact token history per conversation.

Keys (prefix configurable), hash-tagged by conversation so that a conversation's keys share a Redis
Cluster slot:
    <prefix>session:{<conversation id>}   hash: turn, role, next_seq, length, status, worst_level,
                                          worst_category, worst_prob, alert_position, owner, updated,
                                          text_tail, opener_in_tail, verdict_state (debounce
                                          internals, JSON)
    <prefix>history:{<conversation id>}   string: every token id fed to the model, uint32
                                          little-endian, appended per step (4 bytes a token; GETRANGE
                                          reads a prefix)

The history is what the engine rebuilds a conversation's KV cache from (this class is its TokenHistory).
A step's conversations are written by one script call per hash slot: one call in all on a single
Redis, one per slot on a cluster (pipelined, one round trip per node). Each conversation's write is
conditional on the `next_seq` read at the start of the step, which makes a retried write (reply lost)
and a write by a worker that lost the partition both harmless: neither can append history twice.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from pydantic_core import to_json  # a step's session writes: ~3x json.dumps
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from processor.worker.template import TurnState
from processor.worker.verdicts import NO_FLAG, Flag, VerdictState

SessionStatus = Literal["active", "ended", "error"]

# One call writes the sessions of one hash slot, atomically (as MULTI/EXEC would). The fields travel as one
# JSON document rather than as separate arguments: redis-py packs every argument in Python, which cost
# more than everything else of a step's save. KEYS: per conversation its session hash and history.
# ARGV[1]: JSON list, per conversation [expected next_seq ("" = no session yet), ttl seconds, [field,
# value, ...]], all strings; ARGV[1 + i]: the history bytes conversation i appends. Returns per
# conversation 1 when applied, else the next_seq already stored.
_WRITE_SESSIONS = """
local updates = cjson.decode(ARGV[1])
local results = {}
for i, update in ipairs(updates) do
  local session, history = KEYS[2 * i - 1], KEYS[2 * i]
  local expected, ttl, fields, tokens = update[1], update[2], update[3], ARGV[1 + i]
  local stored = redis.call('HGET', session, 'next_seq')
  if (stored or '') ~= expected then
    results[i] = stored or ''
  else
    if expected == '' then redis.call('DEL', history) end
    if #tokens > 0 then redis.call('APPEND', history, tokens) end
    redis.call('HSET', session, unpack(fields))
    redis.call('EXPIRE', session, ttl)
    redis.call('EXPIRE', history, ttl)  -- 0, harmless, when there is none yet
    results[i] = 1
  end
end
return results
"""


class ReplicasBehind(RedisConnectionError):
    """Fewer replicas than asked acknowledged a step's writes in time (`--redis-wait-replicas`)."""


# What a Redis outage or a cluster failover raises: waited out and retried, nothing committed meanwhile.
REDIS_OUTAGES: tuple[type[Exception], ...] = (
    RedisConnectionError,  # ReplicasBehind too
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)


class HistoryMissing(RuntimeError):
    """Redis no longer holds the tokens a conversation's rebuild needs (expired, or Redis lost data)."""


class Session(NamedTuple):
    """A conversation's session as a step finds or leaves it. Immutable; a NamedTuple rather than a
    frozen dataclass because one is made per conversation a step (~0.5 us against ~2.8)."""

    conversation_id: str
    stored: bool = False  # whether Redis had it at the start of the step
    next_seq: int = 0
    length: int = 0  # tokens fed to the model so far
    status: SessionStatus = "active"
    turns: TurnState = TurnState()  # immutable: one default shared by all
    verdicts: VerdictState = VerdictState()
    owner: str = ""
    updated: float = 0.0

    @property
    def closed(self) -> bool:
        return self.status != "active"


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """One conversation's write for a step: the session as it ends the step, and the tokens it fed."""

    before: Session
    after: Session
    fed_token_ids: Sequence[int]


@dataclass(slots=True)
class _SlotWrite:
    """One script call: the updates of a step whose keys share a hash slot."""

    updates: list[SessionUpdate] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    writes: list[list[str | list[str]]] = field(default_factory=list)
    histories: list[bytes] = field(default_factory=list)

    def args(self) -> list[bytes]:
        return [to_json(self.writes), *self.histories]


class SessionStore:
    def __init__(
        self,
        redis: Redis | RedisCluster,
        key_prefix: str,
        session_ttl: int,
        ended_session_ttl: int,
        owner: str,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._prefix = key_prefix
        self._session_ttl = session_ttl
        self._ended_session_ttl = ended_session_ttl
        self._owner = owner
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._write = redis.register_script(_WRITE_SESSIONS)

    def session_key(self, conversation_id: str) -> str:
        return f"{self._prefix}session:{{{conversation_id}}}"

    def history_key(self, conversation_id: str) -> str:
        return f"{self._prefix}history:{{{conversation_id}}}"

    async def load_sessions(self, conversation_ids: Iterable[str]) -> dict[str, Session]:
        """Every listed conversation's session, in one round trip (one per node on a cluster); new ones
        come back empty."""
        conversation_ids = list(conversation_ids)
        async with self._redis.pipeline(transaction=False) as pipe:
            for conversation_id in conversation_ids:
                pipe.hgetall(self.session_key(conversation_id))
            stored = await pipe.execute()
        return {
            conversation_id: session_from_hash(conversation_id, fields)
            for conversation_id, fields in zip(conversation_ids, stored, strict=True)
        }

    async def save(self, updates: Sequence[SessionUpdate]) -> list[str]:
        """Write a step's sessions, each conversation atomically; returns the conversations whose stored
        session had moved on (written by another worker), which the caller must not trust its GPU state
        for. With `wait_replicas`, returns only once that many replicas hold every write."""
        if not updates:
            return []
        now = repr(time.time())
        slots: dict[int, _SlotWrite] = {}
        for update in updates:
            after = update.after
            session_key = self.session_key(after.conversation_id)
            write = slots.setdefault(key_slot(session_key.encode()) if self._cluster else 0, _SlotWrite())
            write.updates.append(update)
            write.keys += [session_key, self.history_key(after.conversation_id)]
            ttl = self._ended_session_ttl if after.closed else self._session_ttl
            expected = str(update.before.next_seq) if update.before.stored else ""
            # Only what changed since the stored session (the write applies only on top of it).
            stored = update.before if update.before.stored else None
            write.writes.append([expected, str(ttl), _hash_fields(after, self._owner, now, stored)])
            write.histories.append(pack_token_ids(update.fed_token_ids))
        writes = list(slots.values())
        if len(writes) == 1 and not self._wait_replicas:
            replies = [await self._write(keys=writes[0].keys, args=writes[0].args())]
        else:
            replies = await self._write_pipelined(writes)
        conflicts = []
        for write, reply in zip(writes, replies, strict=True):
            for update, applied in zip(write.updates, reply, strict=True):
                # A retry of a write whose reply was lost finds its own next_seq stored: already applied.
                if applied != 1 and _as_str(applied) != str(update.after.next_seq):
                    conflicts.append(update.after.conversation_id)
        return conflicts

    async def _write_pipelined(self, writes: list[_SlotWrite]) -> list[list]:
        """Every slot's script call in one pipeline, then WAIT on each connection written to (WAIT
        counts the replicas that acknowledged that connection's writes)."""
        for attempt in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for write in writes:
                    await self._write(keys=write.keys, args=write.args(), client=pipe)
                if self._wait_replicas:
                    for node in self._written_nodes(writes):
                        pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms, **node)
                replies = await pipe.execute(raise_on_error=False)
            script_replies, acks = replies[: len(writes)], replies[len(writes) :]
            if attempt == 0 and any(isinstance(reply, NoScriptError) for reply in script_replies):
                # A cluster pipeline does not load scripts: a new or promoted primary lacks it.
                await self._redis.script_load(_WRITE_SESSIONS)
                continue  # the writes that did apply are recognised as such (their next_seq)
            break
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if any(acked < self._wait_replicas for acked in acks):
            raise ReplicasBehind(
                f"{min(acks)} of {self._wait_replicas} replicas acknowledged the step's session writes "
                f"within {self._wait_timeout_ms} ms"
            )
        return script_replies

    def _written_nodes(self, writes: list[_SlotWrite]) -> list[dict[str, object]]:
        """`execute_command` routing for WAIT: each primary written to on a cluster; the one connection
        of a single Redis's pipeline needs none."""
        if not self._cluster:
            return [{}]
        nodes = {}
        for write in writes:
            node = self._redis.get_node_from_key(write.keys[0])
            nodes[node.name] = node
        return [{"target_nodes": node} for node in nodes.values()]

    async def load(self, conversation_id: str, length: int) -> list[int]:
        """The first `length` token ids fed to the model (the engine's TokenHistory)."""
        if length == 0:
            return []
        data = await self._redis.getrange(self.history_key(conversation_id), 0, 4 * length - 1)
        if len(data) != 4 * length:
            raise HistoryMissing(
                f"conversation {conversation_id!r}: Redis holds {len(data) // 4} of its {length} tokens; "
                "the session expired or Redis lost data (run Redis with appendonly yes)"
            )
        return unpack_token_ids(data)


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def unpack_token_ids(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _as_str(value: bytes | str | int | None) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _hash_fields(session: Session, owner: str, updated: str, stored: Session | None = None) -> list[str]:
    """field, value, ... as strings (floats as repr, so that they read back exactly): all of the
    session's, or, given the session as Redis holds it, those that differ from it, plus owner and
    updated (memory does not track them). A step moves a few fields, and the script's time in Redis
    (its JSON, HSET and the append-only file) scales with the fields written; Redis may share the
    worker's cores."""
    fields = ["owner", owner, "updated", updated]
    turns = session.turns
    if stored is None or turns != stored.turns:
        fields += [
            "turn", str(turns.turn),
            "role", turns.open_role or "",
            "text_tail", turns.text_tail,
            "opener_in_tail", "1" if turns.opener_in_tail else "",
        ]  # fmt: skip
    if stored is None or session.next_seq != stored.next_seq:
        fields += ["next_seq", str(session.next_seq)]
    if stored is None or session.length != stored.length:
        fields += ["length", str(session.length)]
    if stored is None or session.status != stored.status:
        fields += ["status", session.status]
    verdicts = session.verdicts
    if stored is None or verdicts != stored.verdicts:
        flag = verdicts.conversation_flag
        if stored is None or flag != stored.verdicts.conversation_flag:
            fields += [
                "worst_level", flag.level,
                "worst_category", flag.category or "",
                "worst_prob", "" if flag.prob is None else repr(flag.prob),
            ]  # fmt: skip
        alert_position = verdicts.alert_position
        if stored is None or alert_position != stored.verdicts.alert_position:
            fields += ["alert_position", "" if alert_position is None else str(alert_position)]
        fields += ["verdict_state", to_json(_debounce_fields(verdicts)).decode()]
    return fields


def _debounce_fields(state: VerdictState) -> dict[str, object]:
    return {
        "turn": state.turn,
        "previous_flagged": state.previous_flagged,
        "turn_level": state.turn_level,
        "turn_alert_position": state.turn_alert_position,
        "turn_flag": _flag_fields(state.turn_flag),
        "conversation_flag": _flag_fields(state.conversation_flag),
    }


def _flag_fields(flag: Flag) -> dict[str, object]:
    return {
        "level": flag.level,
        "prob": flag.prob,
        "category": flag.category,
        "category_prob": flag.category_prob,
    }


def session_from_hash(conversation_id: str, fields: dict[bytes, bytes]) -> Session:
    if not fields:
        return Session(conversation_id)
    text = {key.decode(): value.decode() for key, value in fields.items()}
    debounce = json.loads(text["verdict_state"])
    alert_position = text["alert_position"]
    return Session(
        conversation_id=conversation_id,
        stored=True,
        next_seq=int(text["next_seq"]),
        length=int(text["length"]),
        status=text["status"],  # type: ignore[arg-type]
        turns=TurnState(
            turn=int(text["turn"]),
            open_role=text["role"] or None,
            text_tail=text["text_tail"],  # type: ignore[arg-type]
            # Absent in sessions of workers before it, which fed the whole opener at once.
            opener_in_tail=text.get("opener_in_tail") == "1",
        ),
        verdicts=VerdictState(
            turn=debounce["turn"],
            previous_flagged=debounce["previous_flagged"],
            turn_level=debounce["turn_level"],
            turn_alert_position=debounce["turn_alert_position"],
            turn_flag=Flag(**debounce["turn_flag"]),
            conversation_flag=Flag(**debounce["conversation_flag"])
            if debounce["conversation_flag"]
            else NO_FLAG,
            alert_position=int(alert_position) if alert_position else None,
        ),
        owner=text["owner"],
        updated=float(text["updated"]),
    )
