"""Hostile and broken input: the decoder never fails but with BadTokenEvent, a worker keeps going
through batches mixing good and bad records, limits hold, and secrets stay out of logs and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import SSLConnection

from processor.events import (
    BadTokenEvent,
    EventLimits,
    TokenEvent,
    decode_token_event,
)
from processor.local.process import spawn, stop
from processor.local.redis import ping
from processor.worker.serve import ensure_topics
from processor.worker.settings import WorkerSettings
from tests.worker.harness import collect, running_worker, worker_settings

from .load import Received, StreamedConversation, check_delivery
from .workers import free_port, http_get

pytestmark = [pytest.mark.timeout(120)]

LIMITS = EventLimits(
    max_record_bytes=4096,
    max_tokens_per_event=8,
    max_text_chars=32,
    max_conversation_id_length=24,
    vocab_size=151_936,
)

# -- the decoder, fuzzed ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
# Each field either valid or a plausible mistake: near-valid events probe every check in turn.
near_valid = st.fixed_dictionaries(
    {
        "conversation_id": st.one_of(
            st.just("conv-1"),
            st.text(max_size=40),
            st.from_regex(r"[A-Za-z0-9._:@+=/-]{1,30}", fullmatch=True),
            st.integers(),
        ),
        "seq": st.one_of(st.integers(min_value=-5, max_value=2**70), st.text(max_size=3), st.booleans()),
        "role": st.sampled_from(["user", "assistant", "system", "", None]),
    },
    optional={
        "token_ids": st.one_of(
            st.lists(st.integers(min_value=-10, max_value=200_000), max_size=12),
            st.lists(st.text(max_size=3), max_size=3),
            st.none(),
        ),
        "text": st.one_of(st.text(max_size=40), st.none(), st.integers()),
        "end_of_turn": st.one_of(st.booleans(), st.text(max_size=3)),
        "end_of_conversation": st.one_of(st.booleans(), st.none()),
        "ts": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4)),
        "extra": json_values,
    },
)
keys = st.one_of(st.none(), st.just(b"conv-1"), st.binary(max_size=40))


def decode_or_refuse(key: bytes | None, value: bytes | None) -> TokenEvent | None:
    """The property: a TokenEvent within the limits, or BadTokenEvent with a reason; nothing else."""
    try:
        event = decode_token_event(key, value, LIMITS)
    except BadTokenEvent as error:
        assert error.reason and isinstance(error.reason, str)
        return None
    assert key == event.conversation_id.encode()
    assert len(value or b"") <= LIMITS.max_record_bytes
    assert len(event.conversation_id) <= LIMITS.max_conversation_id_length
    assert (event.token_ids is None) != (event.text is None)
    if event.token_ids is not None:
        assert len(event.token_ids) <= LIMITS.max_tokens_per_event
        assert all(0 <= token < LIMITS.vocab_size for token in event.token_ids)
    else:
        assert len(event.text) <= LIMITS.max_text_chars
    return event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys, st.one_of(st.none(), st.binary(max_size=5000)))
def test_decoder_arbitrary_bytes(key, value):
    decode_or_refuse(key, value)


@settings(max_examples=300, deadline=None)
@given(keys, json_values)
def test_decoder_arbitrary_json(key, document):
    decode_or_refuse(key, json.dumps(document).encode())


@settings(max_examples=500, deadline=None)
@given(near_valid, st.booleans())
def test_decoder_near_valid_events(fields, key_matches):
    fields = {name: value for name, value in fields.items() if value is not None or name == "role"}
    key = str(fields.get("conversation_id")).encode() if key_matches else b"someone-else"
    decode_or_refuse(key, json.dumps(fields).encode())


# -- whole batches through a worker -----------------------------------------------------------------

GOOD_CONVERSATIONS = 3


def bad_records(valid_event: dict) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, a phrase the DLQ reason must contain), one per way to be wrong."""
    ok = valid_event | {"conversation_id": "bad", "seq": 0}

    def event(**fields) -> bytes:
        return json.dumps({k: v for k, v in (ok | fields).items() if v is not ...}).encode()

    return [
        (b"bad", b"{not json", "Invalid JSON"),
        (b"bad", b"\xff\xfe\x00 not utf-8", "not a valid token event"),
        (b"bad", None, "tombstone"),
        (b"bad", b"[1, 2, 3]", "not a valid token event"),
        (b"bad", event(role=...), "role: Field required"),
        (b"bad", event(surprise=1), "Extra inputs"),
        (b"bad", event(seq=-1), "seq"),
        (b"bad", event(text="hi"), "exactly one of token_ids and text"),
        (b"other", event(), "differs from conversation_id"),
        (None, event(), "no key"),
        (b"bad", event(token_ids=[151_936]), "outside the model's vocabulary"),
        (b"bad", event(token_ids=list(range(9))), "9 token ids, the limit is 8"),
        (b"bad", event(token_ids=..., text="x" * 33), "text is 33 characters, the limit is 32"),
        (b"c" * 25, event(conversation_id="c" * 25), "25 characters, the limit is 24"),
        (b"a b", event(conversation_id="a b"), "conversation_id"),
        (b"bad\n", event(conversation_id="bad\n"), "conversation_id"),
        (b"bad", event(extra="x" * 5000), "bytes, the limit is 4096"),
    ]


async def send_keyed(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]):
    """Sends in order; returns each record's (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        return [(meta.partition, meta.offset) for meta in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_mixed_batch_dead_letters_the_bad_and_moderates_the_good(
    model, kafka_bootstrap, redis_url, topic_prefix, redis_prefix
):
    config = worker_settings(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        redis_prefix,
        max_record_bytes=4096,
        max_tokens_per_event=8,
        max_text_chars=32,
        max_conversation_id_length=24,
    )
    rng = random.Random(11)
    conversations = [
        StreamedConversation(f"good-{index}", [rng.randrange(1000, 100_000) for _ in range(3)])
        for index in range(GOOD_CONVERSATIONS)
    ]
    good: list[list[tuple[bytes, bytes]]] = []
    for conversation in conversations:
        conversation.assistant_ids = [rng.randrange(1000, 100_000) for _ in range(5)]
        events = [("user", token, index == 2, False) for index, token in enumerate(conversation.user_ids)]
        events += [
            ("assistant", token, False, index == 4) for index, token in enumerate(conversation.assistant_ids)
        ]
        conversation.events, conversation.ended = len(events), True
        good.append(
            [
                (
                    conversation.conversation_id.encode(),
                    json.dumps(
                        {
                            "conversation_id": conversation.conversation_id,
                            "seq": seq,
                            "role": role,
                            "token_ids": [token],
                            "end_of_turn": end_of_turn,
                            "end_of_conversation": end,
                        }
                    ).encode(),
                )
                for seq, (role, token, end_of_turn, end) in enumerate(events)
            ]
        )
    bad = bad_records({"role": "user", "token_ids": [5]})
    # Interleave at random, keeping each good conversation's own order: one batch of both kinds.
    records = []
    queues = [list(events) for events in good] + [[(key, value)] for key, value, _ in bad]
    while queues:
        queue = rng.choice(queues)
        records.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    # The topics exist and hold the whole mix before the worker starts: its first polls see both kinds.
    await ensure_topics(config)
    placed = await send_keyed(kafka_bootstrap, config.tokens_topic, records)
    bad_places = {
        place: reason
        for place, (key, value) in zip(placed, records, strict=True)
        for bad_key, bad_value, reason in bad
        if (key, value) == (bad_key, bad_value)
    }
    assert len(bad_places) == len(bad)
    async with running_worker(config, model) as serving:
        verdicts = await collect(
            kafka_bootstrap,
            config.verdicts_topic,
            lambda c: (
                {v["conversation_id"] for v in c.json() if v["kind"] == "conversation_end"}
                >= {c.conversation_id for c in conversations}
            ),
        )
        dead = await collect(kafka_bootstrap, config.dlq_topic, lambda c: len(c.records) >= len(bad))
        # Still serving: a conversation sent after the bad batch is moderated too.
        await send_keyed(
            kafka_bootstrap,
            config.tokens_topic,
            [
                (
                    b"after",
                    json.dumps(
                        {
                            "conversation_id": "after",
                            "seq": 0,
                            "role": "user",
                            "token_ids": [7, 8],
                            "end_of_conversation": True,
                        }
                    ).encode(),
                )
            ],
        )
        await collect(
            kafka_bootstrap,
            config.verdicts_topic,
            lambda c: any(
                v["conversation_id"] == "after" and v["kind"] == "conversation_end" for v in c.json()
            ),
        )
        assert not serving.done()
    letters = dead.json()
    assert len(letters) == len(bad), [letter["reason"] for letter in letters]
    for letter in letters:
        place = (letter["partition"], letter["offset"])
        assert place in bad_places, f"a good record was dead-lettered: {letter}"
        assert bad_places[place] in letter["reason"], (bad_places[place], letter["reason"])
        assert letter["topic"] == config.tokens_topic
    delivery = check_delivery(model, conversations, [Received(0.0, v) for v in verdicts.json()])
    assert not delivery.problems, delivery.problems
    assert delivery.lost == 0 and delivery.token_verdicts == sum(c.events for c in conversations)


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_flood_of_new_conversations_is_capped_and_expires(
    model, kafka_bootstrap, redis_url, topic_prefix, redis_prefix
):
    """Fresh ids past --max-conversations go to the DLQ, even all in one batch; every Redis key the
    flood leaves has a TTL; the KV cache stays within its fixed size."""
    cap, flood = 5, 40
    http_port = free_port()
    config = worker_settings(
        kafka_bootstrap,
        redis_url,
        topic_prefix,
        redis_prefix,
        max_conversations=cap,
        session_ttl=120,
        http_port=http_port,
        kv_cache_bytes=2 * 1024 * 1024,
        kv_cache_dtype="float32",  # the cache's blocks counted below in the model's dtype
    )
    await ensure_topics(config)
    records = [
        (
            f"flood-{index}".encode(),
            json.dumps(
                {"conversation_id": f"flood-{index}", "seq": 0, "role": "user", "token_ids": [100 + index]}
            ).encode(),
        )
        for index in range(flood)
    ]
    await send_keyed(kafka_bootstrap, config.tokens_topic, records)
    async with running_worker(config, model):
        dead = await collect(kafka_bootstrap, config.dlq_topic, lambda c: len(c.records) >= flood - cap)
        verdicts = await collect(
            kafka_bootstrap,
            config.verdicts_topic,
            lambda c: len({v["conversation_id"] for v in c.json()}) >= cap,
        )
        await asyncio.sleep(1)  # anything past the cap would have shown up by now
        _, metrics = await asyncio.to_thread(http_get, http_port, "/metrics")
    moderated = {v["conversation_id"] for v in verdicts.json()}
    refused = {letter["key"] for letter in dead.json()}
    assert len(moderated) == cap and len(refused) == flood - cap and not moderated & refused
    assert all(f"limit of {cap} open conversations" in letter["reason"] for letter in dead.json())
    redis = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{redis_prefix}*")]
        ttls = [await redis.ttl(key) for key in keys]
    finally:
        await redis.aclose()
    assert len(keys) == 2 * cap  # a session hash and a history per moderated conversation
    assert all(0 < ttl <= 120 for ttl in ttls), ttls
    free = _gauge(metrics, "guardstream_kv_blocks_free")
    used = _gauge(metrics, "guardstream_kv_blocks_used")
    assert used + free == 2 * 1024 * 1024 // (16 * _bytes_per_token(model)) and used <= cap


def _gauge(metrics: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))


def _bytes_per_token(model) -> int:
    from processor.engine.kv_cache import bytes_per_token

    return bytes_per_token(model.config, model.dtype)


# -- security settings and secrets ------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=guardstream-test",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(cert), str(key)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_kafka_sasl_ssl_options_pass_through(tls_files, mechanism):
    cafile, certfile, keyfile = tls_files
    settings = WorkerSettings(
        kafka_bootstrap="broker-1:9093,broker-2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism=mechanism,
        sasl_username="svc",
        sasl_password="kafka-secret",
        ssl_cafile=cafile,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    options = settings.kafka_options()
    assert options["bootstrap_servers"] == "broker-1:9093,broker-2:9093"
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == mechanism
    assert options["sasl_plain_username"] == "svc" and options["sasl_plain_password"] == "kafka-secret"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1  # our CA file, not the system store
    # aiokafka accepts them (its constructors validate protocol, mechanism and context together).
    AIOKafkaProducer(**options)
    AIOKafkaConsumer(**options, group_id="g")


async def test_kafka_ssl_without_sasl(tls_files):
    cafile, _, _ = tls_files
    options = WorkerSettings(security_protocol="SSL", ssl_cafile=cafile).kafka_options()
    assert isinstance(options["ssl_context"], ssl.SSLContext) and "sasl_mechanism" not in options
    AIOKafkaProducer(**options)


def test_redis_password_and_tls_pass_through():
    settings = WorkerSettings(
        redis_url="rediss://default:redis-secret@cache.internal:6380/2", redis_timeout=3
    )
    client = settings.redis_client()
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6380, 2)
    assert (kwargs["username"], kwargs["password"]) == ("default", "redis-secret")
    assert kwargs["socket_timeout"] == 3 and kwargs["socket_connect_timeout"] == 3
    assert "redis-secret" not in repr(settings) and "redis-secret" not in str(settings.redacted())


@pytest.fixture
def password_redis(tmp_path: Path):
    """A Redis that needs a password: the worker must send the one in its URL."""
    port = free_port()
    process = spawn(
        "redis",
        [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--requirepass",
            "redis-pw-SECRET",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        tmp_path / "redis.out",
        marker="redis-server",
    )
    for _ in range(100):
        if ping("127.0.0.1", port):
            break
        time.sleep(0.05)
    yield f"redis://:redis-pw-SECRET@127.0.0.1:{port}/0"
    stop(process)


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_secrets_stay_out_of_logs_and_metrics(
    model, kafka_bootstrap, password_redis, topic_prefix, redis_prefix, caplog
):
    http_port = free_port()
    config = worker_settings(
        kafka_bootstrap,
        password_redis,
        topic_prefix,
        redis_prefix,
        http_port=http_port,
        sasl_username="svc",
        sasl_password="kafka-pw-SECRET",  # set but unused on PLAINTEXT
    )
    with caplog.at_level(logging.INFO):
        async with running_worker(config, model):
            await send_keyed(
                kafka_bootstrap,
                config.tokens_topic,
                [
                    (
                        b"s",
                        json.dumps(
                            {
                                "conversation_id": "s",
                                "seq": 0,
                                "role": "user",
                                "token_ids": [5, 6],
                                "end_of_conversation": True,
                            }
                        ).encode(),
                    ),
                    (b"s", b"not json"),
                ],
            )
            await collect(
                kafka_bootstrap,
                config.verdicts_topic,
                lambda c: any(v["kind"] == "conversation_end" for v in c.json()),
            )
            await collect(kafka_bootstrap, config.dlq_topic, lambda c: len(c.records) >= 1)
            pages = [
                await asyncio.to_thread(http_get, http_port, path)
                for path in ("/metrics", "/healthz", "/readyz", "/nope")
            ]
    redis = aioredis.from_url(password_redis)
    try:
        assert await redis.exists(f"{redis_prefix}session:{{s}}")  # the password reached Redis
    finally:
        await redis.aclose()
    assert "worker settings" in caplog.text
    for secret in ("redis-pw-SECRET", "kafka-pw-SECRET"):
        assert secret not in caplog.text
        assert all(secret not in body for _, body in pages)
    assert pages[0][0] == 200 and "guardstream_dead_letters_total 1.0" in pages[0][1]
