"""A faust app that keeps a table of the conversations guardstream cut: conversation id -> where and why.

    pip install 'guardstream[faust]'
    GUARDSTREAM_KAFKA_BOOTSTRAP=localhost:9092 faust -A examples.faust_cut_conversations worker -l info

Settings come from the environment, with the worker's names where it has one:
GUARDSTREAM_KAFKA_BOOTSTRAP (comma separated), GUARDSTREAM_VERDICTS_TOPIC, GUARDSTREAM_PARTITIONS (the
verdicts topic's partition count: the table's changelog must have as many, 12 as the worker creates it),
GUARDSTREAM_FAUST_APP_ID (also the consumer group).

The worker keys verdicts by conversation id, so a conversation's verdicts arrive in one partition and
the table, keyed the same way, stays co-partitioned with the stream. A conversation is cut at its first
alert; later turns' alerts leave its entry as it is. The worker publishes at least once, and a
re-delivered alert carries the same labels, so a duplicate changes nothing.
"""

from __future__ import annotations

import os

import faust

from processor.events import DEFAULT_VERDICTS_TOPIC
from processor.faust_records import VerdictEvent


class Cut(faust.Record, serializer="json", include_metadata=False):
    """Where a conversation was cut and why: the alerting verdict's labels."""

    turn: int
    alert_position: int | None
    risk_level: str | None
    category: str | None


BOOTSTRAP = os.environ.get("GUARDSTREAM_KAFKA_BOOTSTRAP", "localhost:9092")
VERDICTS_TOPIC = os.environ.get("GUARDSTREAM_VERDICTS_TOPIC", DEFAULT_VERDICTS_TOPIC)
PARTITIONS = int(os.environ.get("GUARDSTREAM_PARTITIONS", "12"))

app = faust.App(
    os.environ.get("GUARDSTREAM_FAUST_APP_ID", "guardstream-cut-conversations"),
    broker=[f"kafka://{server.strip()}" for server in BOOTSTRAP.split(",")],
)

verdicts = app.topic(VERDICTS_TOPIC, value_type=VerdictEvent)

cut_conversations = app.Table("cut_conversations", value_type=Cut, partitions=PARTITIONS)


@app.agent(verdicts)
async def record_cuts(stream: faust.StreamT[VerdictEvent]) -> None:
    async for verdict in stream:
        if verdict.alert and verdict.conversation_id not in cut_conversations:
            cut_conversations[verdict.conversation_id] = Cut(
                turn=verdict.turn,
                alert_position=verdict.alert_position,
                risk_level=verdict.risk_level,
                category=verdict.category,
            )
