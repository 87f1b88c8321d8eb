"""Steady token streams, a verdict recorder, and the check that nothing was lost across a fault.

`SteadyLoad` streams conversations through the client (`GuardProducer`), one token per event, round
robin at a fixed rate: a short user turn, then assistant tokens until told to stop (or a cap), then the
end of the conversation. `VerdictRecorder` reads the verdict topic from its start and notes when each
verdict arrived. `check_delivery` then proves, per conversation, that

- every token event has its `tokens` verdict (else: lost), listing exactly the token it carried;
- the positions of each turn are contiguous and the token at each position is the one the whole
  templated conversation has there (no hole, no overlap, the rebuilt state is right);
- labels and probabilities equal `score_ids` on the whole conversation (to 1e-4);
- repeated verdicts (same conversation_id, seq, kind) carry the same labels; they are counted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from processor.client import GuardProducer
from processor.model import GuardModel
from processor.model.tokenizer import special_token_ids
from processor.score import score_ids
from processor.worker.template import render_conversation

PROB_TOLERANCE = 1e-4
RESULTS_FILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "reliability.json"
# The tracked file is docs/reliability.md's source: a test run rewrites it only when asked to.
RECORD_RESULTS = os.environ.get("GUARDSTREAM_RECORD_RESULTS") == "1"


@dataclass
class StreamedConversation:
    conversation_id: str
    user_ids: list[int]
    assistant_ids: list[int] = field(default_factory=list)
    events: int = 0  # token events sent (one token each)
    ended: bool = False
    first_sent: float | None = None  # wall clock of its first and last event
    last_sent: float | None = None

    def rendered(self, model: GuardModel) -> list[int]:
        special = special_token_ids(model.tokenizer)
        return render_conversation([("user", self.user_ids), ("assistant", self.assistant_ids)], special)


def steady_load(config, seed: int = 0, **overrides) -> SteadyLoad:
    """The fault tests' load on the token topic of `config` (WorkerConfig or WorkerSettings): by default
    8 conversations at 4 events/s each, 32 token events/s in all, a modest steady load."""
    return SteadyLoad(config.kafka_bootstrap, config.tokens_topic, seed=seed, **overrides)


class SteadyLoad:
    """`conversations` streams at `rate` events/s each, all interleaved, until `stop()`. A stream ends
    after `max_assistant_tokens`; with `rotate` a new conversation takes its place (a soak's way)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        conversations: int = 8,
        rate: float = 4.0,
        user_tokens: int = 4,
        max_assistant_tokens: int = 400,
        seed: int = 0,
        prefix: str = "conv",
        rotate: bool = False,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate = rate
        self.user_tokens = user_tokens
        self.max_assistant_tokens = max_assistant_tokens
        self.rotate = rotate
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.conversations: list[StreamedConversation] = []  # every one ever started
        self.active = [self._new_conversation() for _ in range(conversations)]
        self._stop = asyncio.Event()
        self.sent = 0

    def _new_conversation(self) -> StreamedConversation:
        user_ids = [self.rng.randrange(1000, 100_000) for _ in range(self.user_tokens)]
        self.conversations.append(StreamedConversation(f"{self.prefix}-{len(self.conversations)}", user_ids))
        return self.conversations[-1]

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        interval = 1.0 / (self.rate * len(self.active))
        async with GuardProducer(self.bootstrap, self.topic) as producer:
            started = time.monotonic()
            while self.active:
                for index, conversation in enumerate(list(self.active)):
                    await self._send_next(producer, conversation)
                    self.sent += 1
                    if conversation.ended:
                        self.active.remove(conversation)
                        if self.rotate and not self._stop.is_set():
                            self.active.insert(index, self._new_conversation())
                    delay = started + self.sent * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            await producer.flush()

    async def _send_next(self, producer: GuardProducer, conversation: StreamedConversation) -> None:
        cid = conversation.conversation_id
        conversation.last_sent = time.time()
        conversation.first_sent = conversation.first_sent or conversation.last_sent
        if conversation.events < len(conversation.user_ids):
            token = conversation.user_ids[conversation.events]
            last = conversation.events == len(conversation.user_ids) - 1
            await producer.send_tokens(cid, "user", [token], end_of_turn=last)
        else:
            token = self.rng.randrange(1000, 100_000)
            conversation.assistant_ids.append(token)
            end = self._stop.is_set() or len(conversation.assistant_ids) >= self.max_assistant_tokens
            await producer.send_tokens(cid, "assistant", [token], end_of_conversation=end)
            conversation.ended = end
        conversation.events += 1


@dataclass
class Received:
    at: float  # wall clock, when the recorder read it
    verdict: dict


class VerdictRecorder:
    """Every verdict on the topic, from its start, with its arrival time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.received: list[Received] = []
        self._task: asyncio.Task | None = None
        self._arrivals: dict[str, list[float]] = {}
        self._indexed = -1

    async def __aenter__(self) -> VerdictRecorder:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for records in batch.values():
                    self.received += [Received(now, json.loads(record.value)) for record in records]
        finally:
            await consumer.stop()

    def ended(self) -> set[str]:
        return {
            r.verdict["conversation_id"] for r in self.received if r.verdict["kind"] == "conversation_end"
        }

    async def wait_ended(self, conversation_ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not conversation_ids <= self.ended():
            if time.monotonic() > deadline:
                missing = sorted(conversation_ids - self.ended())
                raise TimeoutError(f"no conversation_end verdict after {timeout:.0f}s for {missing}")
            await asyncio.sleep(0.2)

    def first_after(self, conversation_id: str, moment: float) -> float | None:
        if self._indexed != len(self.received):
            self._arrivals = defaultdict(list)
            for item in self.received:  # already in arrival order
                self._arrivals[item.verdict["conversation_id"]].append(item.at)
            self._indexed = len(self.received)
        times = self._arrivals.get(conversation_id, [])
        index = bisect.bisect_right(times, moment)
        return times[index] if index < len(times) else None


@dataclass
class Delivery:
    """What `check_delivery` found; `problems` empty means every promise held."""

    events: int
    token_verdicts: int
    lost: int
    duplicates: int
    problems: list[str]


def check_delivery(
    model: GuardModel, conversations: list[StreamedConversation], received: list[Received]
) -> Delivery:
    first: dict[tuple[str, int, str], dict] = {}
    duplicates, problems = 0, []
    for item in received:
        verdict = item.verdict
        key = (verdict["conversation_id"], verdict["seq"], verdict["kind"])
        if key in first:
            duplicates += 1
            if not _same_labels(first[key], verdict):
                problems.append(f"duplicate {key} differs from the first: {verdict} vs {first[key]}")
            continue
        first[key] = verdict
        if verdict["kind"] == "error":
            problems.append(f"error verdict {key}: {verdict.get('error')}")
    lost = 0
    token_verdicts = 0
    for conversation in conversations:
        cid = conversation.conversation_id
        rendered = conversation.rendered(model)
        expected = {verdict.position: verdict for verdict in score_ids(model, rendered)}
        turn_positions: dict[str, list[int]] = defaultdict(list)
        for seq in range(conversation.events):
            verdict = first.get((cid, seq, "tokens"))
            if verdict is None:
                lost += 1
                problems.append(f"{cid}: token event seq {seq} has no tokens verdict")
                continue
            token_verdicts += 1
            sent = (
                conversation.user_ids[seq]
                if seq < len(conversation.user_ids)
                else conversation.assistant_ids[seq - len(conversation.user_ids)]
            )
            if len(verdict["tokens"]) != 1 or verdict["tokens"][0]["token_id"] != sent:
                problems.append(f"{cid} seq {seq}: lists {verdict['tokens']}, sent token {sent}")
                continue
            token = verdict["tokens"][0]
            position = token["position"]
            turn_positions[verdict["role"]].append(position)
            want = expected.get(position)
            if want is None or want.token_id != sent:
                problems.append(
                    f"{cid} seq {seq}: position {position} holds another token in the conversation"
                )
                continue
            if (token["risk_level"], token["category"]) != (want.risk_level, want.category) or abs(
                token["risk_prob"] - want.risk_prob
            ) > PROB_TOLERANCE:
                problems.append(f"{cid} seq {seq} position {position}: streamed {token} != scored {want}")
        for role, positions in turn_positions.items():
            if positions != list(range(positions[0], positions[0] + len(positions))):
                problems.append(f"{cid} {role} turn: positions not contiguous: {positions}")
        if (cid, len(conversation.user_ids) - 1, "prompt") not in first:
            problems.append(f"{cid}: no prompt verdict")
        if (cid, conversation.events - 1, "conversation_end") not in first:
            problems.append(f"{cid}: no conversation_end verdict")
    return Delivery(sum(c.events for c in conversations), token_verdicts, lost, duplicates, problems)


def _labels(verdict: dict) -> list:
    return [(t["position"], t["token_id"], t["risk_level"], t["category"]) for t in verdict.get("tokens", [])]


def _same_labels(a: dict, b: dict) -> bool:
    return _labels(a) == _labels(b) and all(
        abs(x["risk_prob"] - y["risk_prob"]) <= PROB_TOLERANCE
        for x, y in zip(a.get("tokens", []), b.get("tokens", []), strict=True)
    )


def recovery_seconds(recorder: VerdictRecorder, load: SteadyLoad, resumed_at: float) -> float:
    """From `resumed_at` (the fault, or the service coming back) until every conversation that was
    streaming then has a new verdict."""
    waits = []
    for conversation in load.conversations:
        if conversation.first_sent is None or conversation.first_sent > resumed_at:
            continue
        arrived = recorder.first_after(conversation.conversation_id, resumed_at)
        if arrived is not None:
            waits.append(arrived - resumed_at)
    return round(max(waits), 2) if waits else 0.0


async def events_on_topic(bootstrap: str, topic: str) -> int:
    """Records on every partition of `topic`: what the producer really delivered."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()


def record_result(fault: str, row: dict) -> None:
    """Print one fault's figures; with GUARDSTREAM_RECORD_RESULTS=1, merge them into
    bench/results/reliability.json (docs/reliability.md's source) too."""
    print(f"\n[{fault}] " + json.dumps(row, sort_keys=True))
    if not RECORD_RESULTS:
        return
    try:
        rows = json.loads(RESULTS_FILE.read_text())
    except (OSError, ValueError):
        rows = {}
    rows[fault] = row | {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS_FILE.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


async def finish_and_check(
    fault: str,
    model: GuardModel,
    load: SteadyLoad,
    load_task: asyncio.Task,
    recorder: VerdictRecorder,
    resumed_at: float | None,
    timeout: float = 90.0,
    lossless: bool = True,
    **facts: object,
) -> Delivery:
    """Ends the streams, waits for every conversation's end verdict, checks delivery, records the row.

    `facts` go into the row as they are, or called when they are callables (read after the end). The
    row is written before the assertions, so a failing run still leaves its figures behind. A fault
    that is expected to lose data (`lossless=False`) leaves the checks of the delivery to the caller."""
    load.stop()
    await asyncio.wait_for(load_task, timeout=60)
    ids = {conversation.conversation_id for conversation in load.conversations}
    try:
        await recorder.wait_ended(ids, timeout)
        await asyncio.sleep(1.0)  # a late duplicate from a redelivery still counts
    finally:
        delivery = check_delivery(model, load.conversations, recorder.received)
        delivered = await events_on_topic(load.bootstrap, load.topic)
        record_result(
            fault,
            {
                "events_sent": load.sent,
                "events_on_topic": delivered,
                "token_verdicts": delivery.token_verdicts,
                "lost": delivery.lost,
                "duplicated_verdicts": delivery.duplicates,
                "recovery_s": None if resumed_at is None else recovery_seconds(recorder, load, resumed_at),
                "problems": delivery.problems[:5],
                **{name: value() if callable(value) else value for name, value in facts.items()},
            },
        )
    assert delivered == load.sent, "the producer lost events: the check below would blame the worker"
    if lossless:
        assert not delivery.problems, "\n".join(delivery.problems[:20])
        assert delivery.lost == 0
    return delivery


async def committed_offsets(bootstrap: str, group_id: str) -> int:
    """Sum of the group's committed offsets (what a restarted worker would resume from)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
        return sum(meta.offset for meta in offsets.values() if meta.offset >= 0)
    finally:
        await admin.close()
