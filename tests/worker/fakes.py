"""Hand-made engine results, label maps and a scripted consumer for the worker's pure-logic tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiokafka import TopicPartition

from processor.engine.results import ChunkResult, HeadLabels
from processor.events import Verdict, VerdictEvent, parse_verdict, verdict_json
from processor.model.labels import LabelMaps
from processor.model.testmodel import CATEGORY_LABELS, QUERY_CATEGORY_LABELS, RISK_LEVEL_LABELS

# The published checkpoints' label maps, as the test checkpoints write them.
LABELS = LabelMaps(
    risk_levels=RISK_LEVEL_LABELS,
    categories=CATEGORY_LABELS,
    query_risk_levels=RISK_LEVEL_LABELS,
    query_categories=QUERY_CATEGORY_LABELS,
)
SAFE, UNSAFE, CONTROVERSIAL = 0, 1, 2


def chunk(
    token_ids: list[int],
    response_levels: list[int],
    query_levels: list[int] | None = None,
    start: int = 0,
    conversation_id: str = "c",
) -> ChunkResult:
    """A result whose response heads say `response_levels` (category = position % 8, probs 0.9)."""
    query_levels = query_levels if query_levels is not None else [SAFE] * len(token_ids)
    n = len(token_ids)

    def heads(levels: list[int]) -> HeadLabels:
        return HeadLabels(list(levels), [0.9] * n, [(start + i) % 8 for i in range(n)], [0.8] * n)

    return ChunkResult(
        conversation_id=conversation_id,
        request_id=0,
        start_position=start,
        token_ids=list(token_ids),
        response=heads(response_levels),
        query=heads(query_levels),
    )


def on_the_wire(verdicts: list[Verdict]) -> list[VerdictEvent]:
    """The verdicts as a reader gets them: the worker's JSON, validated against the contract (extra
    fields, missing fields or wrong types fail here)."""
    return [parse_verdict(verdict_json(verdict)) for verdict in verdicts]


class ScriptedConsumer:
    """What the worker asks of its consumer, scripted: getmany answers from `answers` in turn (then
    nothing) and records what it was asked, and seek records where it was sent; `assigned` is the
    assignment prepare finds. An answer may be a coroutine function, awaited by that getmany (what
    happens while the fetch is out, a rebalance say) for the records it returns."""

    def __init__(
        self, *answers: dict | Callable[[], Awaitable[dict]], assigned: Iterable[TopicPartition] = ()
    ) -> None:
        self.answers = list(answers)
        self.assigned = set(assigned)
        self.calls: list[tuple[int, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.calls.append((timeout_ms, max_records))
        answer = self.answers.pop(0) if self.answers else {}
        return await answer() if callable(answer) else answer

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def highwater(self, partition: TopicPartition) -> None:
        return None
