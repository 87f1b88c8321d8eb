"""The faust records against the wire schema, and the example faust app against a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from processor.events import VERDICT_EVENTS, EventLimits, TokenVerdict, VerdictEvent, decode_token_event
from processor.events import TokenEvent as TokenEventModel

faust = pytest.importorskip("faust")

from processor import faust_records  # noqa: E402 (only where faust is installed)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Each wire type and the record that must mirror it.
MIRRORS = [
    (TokenEventModel, faust_records.TokenEvent),
    (TokenVerdict, faust_records.TokenVerdict),
    (VerdictEvent, faust_records.VerdictEvent),
]

JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def schema_shape(prop: dict[str, Any]) -> frozenset[str]:
    """A JSON Schema property as a set of type names: `array[integer]`, `object TokenVerdict`, `null`, ..."""
    if "anyOf" in prop:
        return frozenset().union(*(schema_shape(option) for option in prop["anyOf"]))
    if "$ref" in prop:
        return frozenset({f"object {prop['$ref'].rsplit('/', 1)[-1]}"})
    if "enum" in prop:
        return frozenset({f"enum {sorted(prop['enum'])}"})
    if prop.get("type") == "array":
        return frozenset(f"array[{item}]" for item in schema_shape(prop["items"]))
    return frozenset({prop["type"]})


def record_shape(annotation: Any) -> frozenset[str]:
    """A record field's annotation as the same set of type names."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(record_shape(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return frozenset({f"enum {sorted(typing.get_args(annotation))}"})
    if origin is list:
        (item,) = typing.get_args(annotation)
        return frozenset(f"array[{shape}]" for shape in record_shape(item))
    if isinstance(annotation, type) and issubclass(annotation, faust.Record):
        return frozenset({f"object {annotation.__name__}"})
    return frozenset({JSON_TYPES[annotation]})


@pytest.mark.parametrize(("wire_type", "record"), MIRRORS, ids=lambda item: item.__qualname__)
def test_every_schema_field_has_a_record_field_of_the_same_type_and_default(
    wire_type: type, record: type
) -> None:
    schema = TypeAdapter(wire_type).json_schema()
    properties, required = schema["properties"], set(schema.get("required", ()))
    fields, defaults = record._options.fields, record._options.defaults

    assert set(fields) == set(properties), f"{record.__name__} and the schema name different fields"
    for name, prop in properties.items():
        assert record_shape(fields[name]) == schema_shape(prop), name
        if "default" in prop:
            assert defaults.get(name, "no default") == prop["default"], name
        elif name in required and "null" not in schema_shape(prop):
            assert name not in defaults, f"{name} is required by the schema"


def test_a_verdict_reads_into_the_records_and_writes_back_unchanged() -> None:
    verdict = VerdictEvent(
        conversation_id="c-42",
        seq=7,
        turn=1,
        role="assistant",
        kind="tokens",
        risk_level="Unsafe",
        risk_prob=0.91,
        category="Violent",
        category_prob=0.77,
        tokens=[
            TokenVerdict(
                position=30, token_id=11, risk_level="Safe", risk_prob=0.1, category=None, category_prob=None
            ),
            TokenVerdict(
                position=31,
                token_id=12764,
                risk_level="Unsafe",
                risk_prob=0.91,
                category="Violent",
                category_prob=0.77,
            ),
        ],
        alert=True,
        alert_position=31,
        latency_ms=12.5,
        model="Qwen3Guard-Stream-0.6B",
    )
    wire = VERDICT_EVENTS.dump_json(verdict)

    record = faust_records.VerdictEvent.loads(wire, serializer="json")

    assert isinstance(record.tokens[1], faust_records.TokenVerdict)
    assert (record.alert_position, record.tokens[1].category) == (31, "Violent")
    assert VERDICT_EVENTS.validate_json(record.dumps()) == verdict


def test_a_token_event_record_is_one_the_worker_accepts() -> None:
    record = faust_records.TokenEvent(conversation_id="c-42", seq=0, role="user", token_ids=[9707, 11])

    event = decode_token_event(b"c-42", record.dumps(), EventLimits())

    assert event == TokenEventModel(conversation_id="c-42", seq=0, role="user", token_ids=[9707, 11])


def test_importing_processor_and_the_worker_does_not_import_faust() -> None:
    check = (
        "import sys, processor, processor.cli, processor.client, processor.worker.serve; "
        "assert 'faust' not in sys.modules and 'mode' not in sys.modules, 'faust was imported'"
    )
    subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, check=True, timeout=60)


# --- The example app against the broker -------------------------------------------------------------


def verdict(
    conversation_id: str, seq: int, *, alert: bool = False, turn: int = 1, **labels: Any
) -> VerdictEvent:
    unsafe = alert or labels.get("risk_level") == "Unsafe"
    fields: dict[str, Any] = {
        "risk_level": "Unsafe" if unsafe else "Safe",
        "risk_prob": 0.9 if unsafe else 0.1,
        "category": "Violent" if unsafe else None,
        "category_prob": 0.8 if unsafe else None,
        **labels,
    }
    return VerdictEvent(
        conversation_id=conversation_id,
        seq=seq,
        turn=turn,
        role="assistant",
        kind="tokens",
        alert=alert,
        alert_position=40 + seq if alert else None,
        model="Qwen3Guard-Stream-0.6B",
        **fields,
    )


async def produce(bootstrap: str, topic: str, verdicts: list[VerdictEvent]) -> dict[TopicPartition, int]:
    """Sends the verdicts keyed by conversation id, as the worker does; returns the topic's end offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event in verdicts:
            await producer.send_and_wait(
                topic, VERDICT_EVENTS.dump_json(event), key=event.conversation_id.encode()
            )
        partitions = [TopicPartition(topic, partition) for partition in await producer.partitions_for(topic)]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()


async def committed_all(bootstrap: str, group_id: str, ends: dict[TopicPartition, int]) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
    except KafkaError as error:
        if error.retriable:  # a fresh broker still creating __consumer_offsets has no coordinator yet
            return False
        raise
    finally:
        await admin.close()
    return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items() if end)


async def run_app_until_processed(
    bootstrap: str, env: dict[str, str], datadir: Path, ends: dict[TopicPartition, int], log: Path
) -> float:
    """Runs the example as `faust worker` until its group has committed `ends`, then stops it; seconds."""
    command = [sys.executable, "-m", "faust", "--datadir", str(datadir)]
    command += ["-A", "examples.faust_cut_conversations", "worker", "--without-web", "-l", "info"]
    with log.open("wb") as log_file:
        app = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        # faust commits an offset once the agent has processed the verdicts before it.
        while not await committed_all(bootstrap, env["GUARDSTREAM_FAUST_APP_ID"], ends):
            assert app.poll() is None, f"the faust worker exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() - started < 40, (
                f"no commit of every verdict in 40 s:\n{log.read_text()[-4000:]}"
            )
            await asyncio.sleep(0.5)
    finally:
        # A worker stopped with SIGTERM flushes its changelog writes before it exits.
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
    assert app.returncode == 0, f"the faust worker exited with {app.returncode}:\n{log.read_text()[-4000:]}"
    return time.monotonic() - started


async def read_table(bootstrap: str, changelog: str, partitions: int) -> dict[str, dict[str, Any]]:
    """The table as its changelog holds it: the last value of each key (faust writes keys as JSON)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assert changelog in await consumer.topics(), f"no changelog topic {changelog}"
        changelog_partitions = [TopicPartition(changelog, partition) for partition in range(partitions)]
        consumer.assign(changelog_partitions)
        await consumer.seek_to_beginning(*changelog_partitions)
        ends = await consumer.end_offsets(changelog_partitions)
        table: dict[str, dict[str, Any]] = {}
        for tp, end in ends.items():
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    table[json.loads(record.key)] = json.loads(record.value)
        return table
    finally:
        await consumer.stop()


@pytest.mark.integration
@pytest.mark.timeout(150)
async def test_the_example_app_tables_exactly_the_cut_conversations_across_a_restart(
    kafka_bootstrap: str, unique_topic: Any, tmp_path: Path
) -> None:
    topic, app_id, partitions = unique_topic("verdicts"), unique_topic("faust-app"), 3
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "GUARDSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "GUARDSTREAM_VERDICTS_TOPIC": topic,
        "GUARDSTREAM_PARTITIONS": str(partitions),
        "GUARDSTREAM_FAUST_APP_ID": app_id,
    }
    changelog = f"{app_id}-cut_conversations-changelog"
    error = VerdictEvent(
        conversation_id="error",
        seq=2,
        turn=0,
        role="user",
        kind="error",
        risk_level=None,
        risk_prob=None,
        category=None,
        category_prob=None,
        model="Qwen3Guard-Stream-0.6B",
        error="seq gap: expected 0, got 2",
    )
    ends = await produce(
        kafka_bootstrap,
        topic,
        [
            verdict("cut-once", 0),
            verdict("cut-once", 1, alert=True),
            verdict("cut-once", 1, alert=True),  # a re-delivery
            verdict("cut-twice", 0, alert=True, category="Jailbreak", turn=1),
            verdict("cut-twice", 5, alert=True, category="Violent", turn=3),  # a later turn's alert
            verdict("flagged-no-alert", 0, risk_level="Unsafe"),  # one flagged token does not alert
            verdict("safe", 0),
            verdict("safe", 1),
            error,
        ],
    )
    cut = {
        "cut-once": {"turn": 1, "alert_position": 41, "risk_level": "Unsafe", "category": "Violent"},
        "cut-twice": {"turn": 1, "alert_position": 40, "risk_level": "Unsafe", "category": "Jailbreak"},
    }

    first_run = await run_app_until_processed(
        kafka_bootstrap, env, tmp_path / "data", ends, tmp_path / "1.log"
    )

    assert await read_table(kafka_bootstrap, changelog, partitions) == cut

    # A restarted app recovers the table from its changelog, so an earlier cut still wins.
    ends = await produce(
        kafka_bootstrap,
        topic,
        [
            verdict("cut-once", 9, alert=True, category="Jailbreak", turn=5),
            verdict("cut-after-restart", 3, alert=True),
        ],
    )
    cut["cut-after-restart"] = {
        "turn": 1,
        "alert_position": 43,
        "risk_level": "Unsafe",
        "category": "Violent",
    }

    second_run = await run_app_until_processed(
        kafka_bootstrap, env, tmp_path / "data", ends, tmp_path / "2.log"
    )

    assert await read_table(kafka_bootstrap, changelog, partitions) == cut
    print(f"faust worker runs until every verdict was committed: {first_run:.1f} s, {second_run:.1f} s")
