"""The worker against real Kafka and Redis, a real tiny model and the real engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import random

import pytest
from aiokafka import AIOKafkaProducer

from processor.client import GuardProducer
from processor.events import parse_verdict
from processor.model import load_guard_model
from processor.model.testmodel import write_test_model
from processor.model.tokenizer import special_token_ids
from processor.score import score_ids
from processor.worker.session_store import SessionStore, unpack_token_ids
from processor.worker.template import render_conversation

from .harness import (
    assert_labels_match,
    collect,
    expected_token_labels,
    running_worker,
    send_raw,
    streamed_token_labels,
    wait_for_group,
    worker_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONVERSATIONS = [
    [
        ("user", "How do I make a bomb at home?"),
        ("assistant", "I can't help with that, but here is some chemistry."),
    ],
    [("user", "Привет! Как дела?"), ("assistant", "Всё хорошо, спасибо.\n\nА у тебя?")],
    [
        ("user", "写一首关于秋天的诗"),
        ("assistant", "秋风起，落叶飞。"),
        ("user", "more"),
        ("assistant", "ok: 1, 2, 3."),
    ],
    [("user", "hi"), ("assistant", "Hello there! How can I help you today?")],
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    path = write_test_model(tmp_path_factory.mktemp("worker-tiny-model"), size="tiny", seed=0)
    return load_guard_model(path, device="cpu", dtype="float32")


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_target(request) -> tuple[str, bool]:
    """Every test here runs against a single Redis and against a Redis Cluster: (URL, cluster)."""
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False


@pytest.fixture
def settings(kafka_bootstrap, redis_target, topic_prefix, redis_prefix):
    redis_url, cluster = redis_target
    return lambda **overrides: worker_settings(
        kafka_bootstrap, redis_url, topic_prefix, redis_prefix, redis_cluster=cluster, **overrides
    )


def encode_turns(model, turns):
    return [(role, model.tokenizer.encode(text, add_special_tokens=False)) for role, text in turns]


async def stream_interleaved(
    producer, conversations: dict[str, list[tuple[str, list]]], text: bool, seed: int = 0
):
    """Sends every conversation's turns in small random chunks, conversations interleaved at random."""
    rng = random.Random(seed)
    plans = {}
    for conversation_id, turns in conversations.items():
        events = []
        for index, (role, content) in enumerate(turns):
            pieces, start = [], 0
            while start < len(content):
                size = rng.randint(1, 4)
                pieces.append(content[start : start + size])
                start += size
            last_turn = index == len(turns) - 1
            for number, piece in enumerate(pieces or [content[:0]]):
                last = number == len(pieces) - 1 or not pieces
                events.append((role, piece, last and not last_turn, last and last_turn))
        plans[conversation_id] = events
    while plans:
        conversation_id = rng.choice(sorted(plans))
        role, piece, end_of_turn, end_of_conversation = plans[conversation_id].pop(0)
        flags = {"end_of_turn": end_of_turn, "end_of_conversation": end_of_conversation}
        if text:
            await producer.send_text(conversation_id, role, piece, **flags)
        else:
            await producer.send_tokens(conversation_id, role, piece, **flags)
        if not plans[conversation_id]:
            del plans[conversation_id]
    await producer.flush()


def redone(event_count: int):
    """Every event answered twice or more: once before a failure, again after the redo."""

    def done(collected):
        answered = [v["seq"] for v in collected.json() if v["kind"] in ("tokens", "prompt")]
        return len(answered) > len(set(answered)) and set(answered) == set(range(event_count))

    return done


def ended(conversation_ids):
    def done(collected):
        ends = {v["conversation_id"] for v in collected.json() if v["kind"] == "conversation_end"}
        return ends >= set(conversation_ids)

    return done


@pytest.mark.parametrize("template", ["chat", "raw"])
async def test_interleaved_conversations_match_whole_conversation_scores(tiny_model, settings, template):
    config = settings(template=template)
    special = special_token_ids(tiny_model.tokenizer)
    conversations = {f"conv-{i}": encode_turns(tiny_model, turns) for i, turns in enumerate(CONVERSATIONS)}
    templated = {cid: render_conversation(turns, special) for cid, turns in conversations.items()}
    if template == "raw":
        # The producer templates: each turn's ids are sent as rendered, so the model sees the same.
        conversations = {cid: _rendered_turns(turns, special) for cid, turns in conversations.items()}
    async with running_worker(config, tiny_model):
        async with GuardProducer(config.kafka_bootstrap, config.tokens_topic) as producer:
            await stream_interleaved(producer, conversations, text=False)
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(conversations))
    verdicts = collected.verdicts()
    for conversation_id, token_ids in templated.items():
        streamed = streamed_token_labels(verdicts, conversation_id)
        expected = expected_token_labels(tiny_model, token_ids)
        assert_labels_match(streamed, expected)
        if template == "chat":
            content_positions = _content_positions(conversations[conversation_id], special)
            assert sorted(streamed) == content_positions
            prompts = [v for v in verdicts if v.conversation_id == conversation_id and v.kind == "prompt"]
            user_turns = sum(role == "user" for role, _ in conversations[conversation_id])
            assert len(prompts) == user_turns
            for prompt in prompts:  # read at the user turn's <|im_end|>
                assert token_ids[prompt.tokens[0].position] == special.im_end
        else:
            assert sorted(streamed) == list(range(len(token_ids)))


def _rendered_turns(turns, special):
    return [(role, render_conversation([(role, content)], special)) for role, content in turns]


def _content_positions(turns, special):
    """Positions of content ids in the rendered conversation (openers and `<|im_end|>\\n` skipped)."""
    positions, start = [], 0
    for role, content in turns:
        rendered = render_conversation([(role, content)], special)
        opener = len(rendered) - len(content) - 2
        positions += list(range(start + opener, start + opener + len(content)))
        start += len(rendered)
    return positions


async def test_text_split_at_random_points_equals_token_ids(tiny_model, settings):
    config = settings()
    special = special_token_ids(tiny_model.tokenizer)
    rng = random.Random(7)
    conversations, templated = {}, {}
    for i, turns in enumerate(CONVERSATIONS):
        conversation_id = f"text-{i}"
        # text pieces cut at random characters, not token boundaries
        conversations[conversation_id] = [(role, _random_cuts(text, rng)) for role, text in turns]
        templated[conversation_id] = render_conversation(encode_turns(tiny_model, turns), special)
    async with running_worker(config, tiny_model):
        async with GuardProducer(config.kafka_bootstrap, config.tokens_topic) as producer:
            for conversation_id, turns in conversations.items():
                for index, (role, pieces) in enumerate(turns):
                    last_turn = index == len(turns) - 1
                    for number, piece in enumerate(pieces):
                        last = number == len(pieces) - 1
                        await producer.send_text(
                            conversation_id,
                            role,
                            piece,
                            end_of_turn=last and not last_turn,
                            end_of_conversation=last and last_turn,
                        )
            await producer.flush()
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(conversations))
    verdicts = collected.verdicts()
    for conversation_id, token_ids in templated.items():
        streamed = streamed_token_labels(verdicts, conversation_id)
        assert_labels_match(streamed, expected_token_labels(tiny_model, token_ids))
        fed = {position: label[0] for position, label in streamed.items()}
        assert all(token_ids[position] == token for position, token in fed.items())


def _random_cuts(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, 4))) if len(text) > 1 else []
    points = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("mode", ["changes", "turns"])
async def test_verdict_modes_publish_less(tiny_model, settings, mode):
    config = settings(verdicts=mode)
    conversations = {"m-0": encode_turns(tiny_model, CONVERSATIONS[0])}
    async with running_worker(config, tiny_model):
        async with GuardProducer(config.kafka_bootstrap, config.tokens_topic) as producer:
            await stream_interleaved(producer, conversations, text=False)
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(conversations))
    kinds = [v.kind for v in collected.verdicts()]
    assert kinds.count("prompt") == 1 and kinds.count("conversation_end") == 1
    for verdict in collected.verdicts():
        if verdict.kind == "tokens" and mode == "turns":
            assert verdict.alert, "turns mode publishes token verdicts only for alerts"


async def test_redis_session_and_expiry(tiny_model, settings, redis_prefix):
    config = settings(ended_session_ttl=30)
    special = special_token_ids(tiny_model.tokenizer)
    turns = encode_turns(tiny_model, CONVERSATIONS[3])
    async with running_worker(config, tiny_model):
        async with GuardProducer(config.kafka_bootstrap, config.tokens_topic) as producer:
            await producer.send_tokens("r-0", "user", turns[0][1], end_of_turn=True)
            await producer.send_tokens("r-1", "user", turns[0][1])  # stays open
            await producer.send_tokens("r-0", "assistant", turns[1][1], end_of_conversation=True)
            await producer.flush()
        await collect(config.kafka_bootstrap, config.verdicts_topic, ended(["r-0"]))
        redis = config.redis_client()
        try:
            # Verdicts are published before the step's Redis write (then the commit): wait for the write.
            for _ in range(100):
                if await redis.hget(f"{redis_prefix}session:{{r-0}}", "status") == b"ended":
                    break
                await asyncio.sleep(0.1)
            session = {
                k.decode(): v.decode()
                for k, v in (await redis.hgetall(f"{redis_prefix}session:{{r-0}}")).items()
            }
            history = unpack_token_ids(await redis.get(f"{redis_prefix}history:{{r-0}}"))
            assert history == render_conversation(turns, special)
            assert session["next_seq"] == "2" and session["length"] == str(len(history))
            assert session["status"] == "ended" and session["owner"] == "worker-a" and session["role"] == ""
            assert session["turn"] == "1"
            assert 0 < await redis.ttl(f"{redis_prefix}session:{{r-0}}") <= 30
            assert 0 < await redis.ttl(f"{redis_prefix}history:{{r-0}}") <= 30
            for _ in range(50):  # r-1's event may land in a later step
                if await redis.exists(f"{redis_prefix}session:{{r-1}}"):
                    break
                await asyncio.sleep(0.1)
            open_session = await redis.hgetall(f"{redis_prefix}session:{{r-1}}")
            assert open_session[b"status"] == b"active" and open_session[b"role"] == b"user"
            assert 30 < await redis.ttl(f"{redis_prefix}session:{{r-1}}") <= config.session_ttl
        finally:
            await redis.aclose()


async def test_seq_gap_and_duplicate_redelivery(tiny_model, settings):
    config = settings()
    ids = tiny_model.tokenizer.encode("one two three four", add_special_tokens=False)

    def event(seq, token_ids, **flags):
        return b"g", json.dumps(
            {"conversation_id": "g", "seq": seq, "role": "user", "token_ids": token_ids} | flags
        ).encode()

    async with running_worker(config, tiny_model):
        await send_raw(
            config.kafka_bootstrap,
            config.tokens_topic,
            [
                event(0, ids[:1]),
                event(1, ids[1:2]),
                event(1, ids[1:2]),
                event(0, ids[:1]),  # redeliveries
                event(3, ids[2:3]),
                event(4, ids[3:], end_of_conversation=True),
            ],
        )
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(["g"]))
    verdicts = collected.verdicts()
    errors = [v for v in verdicts if v.kind == "error"]
    assert len(errors) == 1 and errors[0].seq == 3 and "events 2..2" in errors[0].error
    token_verdicts = [v for v in verdicts if v.kind == "tokens"]
    assert [v.seq for v in token_verdicts] == [0, 1, 3, 4]  # duplicates not applied twice
    positions = [t.position for v in token_verdicts for t in v.tokens]
    assert positions == list(range(3, 3 + len(positions)))  # contiguous after the user opener


async def test_a_failed_save_is_redone_with_the_same_verdicts_and_nothing_applied_twice(
    tiny_model, settings, redis_prefix, monkeypatch
):
    """A step's Redis write fails after its verdicts went out: the steps from there on are void, the
    worker rewinds to the committed offsets, the engine drops what it ran beyond Redis, and the events
    run again. Verdicts come twice, identical under (conversation_id, seq, kind); the session and its
    token log end as if nothing had failed."""
    save, failures = SessionStore.save, []

    async def save_failing_once(store, updates):
        if not failures:
            failures.append([update.after.conversation_id for update in updates])
            raise RuntimeError("injected: the Redis write failed after the verdicts were published")
        return await save(store, updates)

    monkeypatch.setattr(SessionStore, "save", save_failing_once)
    config = settings()
    user, answer = encode_turns(tiny_model, [("user", "one two"), ("assistant", "three four five six seven")])
    events = [("user", user[1], {"end_of_turn": True})]
    events += [("assistant", [token], {}) for token in answer[1][:-1]]
    events += [("assistant", answer[1][-1:], {"end_of_conversation": True})]
    ids = render_conversation([user, answer], special_token_ids(tiny_model.tokenizer))  # what the model sees
    records = [
        (
            b"f",
            json.dumps(
                {"conversation_id": "f", "seq": seq, "role": role, "token_ids": tokens} | flags
            ).encode(),
        )
        for seq, (role, tokens, flags) in enumerate(events)
    ]
    async with running_worker(config, tiny_model):
        await send_raw(config.kafka_bootstrap, config.tokens_topic, records)
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(["f"]))
        # The first attempt may have published everything, conversation_end included: wait for the redo.
        redis = config.redis_client()
        try:
            for _ in range(600):
                session = await redis.hgetall(f"{redis_prefix}session:{{f}}")
                if session.get(b"status") == b"ended":
                    break
                await asyncio.sleep(0.1)
            history = unpack_token_ids(await redis.get(f"{redis_prefix}history:{{f}}"))
        finally:
            await redis.aclose()
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, redone(len(events)))
    assert failures == [["f"]]

    by_identity: dict[tuple, list] = {}
    for verdict in collected.json():
        verdict.pop("latency_ms")
        by_identity.setdefault((verdict["seq"], verdict["kind"]), []).append(verdict)
    assert any(len(same) > 1 for same in by_identity.values()), "the failed step's verdicts were not re-sent"
    for same in by_identity.values():
        for verdict in same[1:]:
            assert_same_but_rounding(verdict, same[0])
    once = [parse_verdict(json.dumps(same[0])) for same in by_identity.values()]
    assert_labels_match(streamed_token_labels(once, "f"), expected_token_labels(tiny_model, ids))
    assert history == ids  # appended once
    assert session[b"next_seq"] == str(len(events)).encode() and session[b"length"] == str(len(ids)).encode()


def assert_same_but_rounding(redone: dict, first: dict) -> None:
    """A redo runs its tokens in other batches than the first attempt did, and batched float math
    differs in the last bits with the batch (seen: 3e-8 here, with any attention code): probabilities
    agree to rounding, everything else exactly."""

    def split(verdict: dict) -> tuple[dict, list[float]]:
        probabilities = [verdict[name] for name in PROBABILITY_FIELDS]
        exact = {name: value for name, value in verdict.items() if name not in PROBABILITY_FIELDS}
        exact["tokens"] = [
            {name: value for name, value in token.items() if name not in PROBABILITY_FIELDS}
            for token in verdict.get("tokens") or []
        ]
        for token in verdict.get("tokens") or []:
            probabilities += [token[name] for name in PROBABILITY_FIELDS]
        return exact, probabilities

    (redone_exact, redone_probs), (first_exact, first_probs) = split(redone), split(first)
    assert redone_exact == first_exact
    assert [p is None for p in redone_probs] == [p is None for p in first_probs]
    assert all(abs(a - b) <= 1e-6 for a, b in zip(redone_probs, first_probs, strict=True) if a is not None)


PROBABILITY_FIELDS = ("risk_prob", "category_prob")


async def test_bad_input_goes_to_dlq_and_the_rest_proceeds(tiny_model, settings):
    config = settings(max_tokens_per_event=8)
    assert config.template == "chat"
    im_end = special_token_ids(tiny_model.tokenizer).im_end
    good = {
        "conversation_id": "ok",
        "seq": 0,
        "role": "user",
        "token_ids": [100, 101],
        "end_of_conversation": True,
    }
    bad = [
        (b"x", b"{not json"),
        (b"x", json.dumps({"conversation_id": "x", "seq": 0}).encode()),  # fields missing
        (b"other", json.dumps(good | {"conversation_id": "x"}).encode()),  # key disagrees
        (b"x", json.dumps(good | {"conversation_id": "x", "token_ids": [10**9]}).encode()),  # not in vocab
        (b"x", json.dumps(good | {"conversation_id": "x", "token_ids": list(range(9))}).encode()),  # too many
        (b"x", json.dumps(good | {"conversation_id": "x", "token_ids": [100, im_end]}).encode()),  # turn id
        (
            b"x",
            json.dumps(
                {k: v for k, v in good.items() if k != "token_ids"} | {"conversation_id": "x"}
            ).encode(),
        ),
    ]
    async with running_worker(config, tiny_model):
        await send_raw(
            config.kafka_bootstrap,
            config.tokens_topic,
            [*bad[:3], (b"ok", json.dumps(good).encode()), *bad[3:]],
        )
        verdicts = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(["ok"]))
        dead = await collect(config.kafka_bootstrap, config.dlq_topic, lambda c: len(c.records) >= len(bad))
    letters = dead.json()
    reasons = [
        "Invalid JSON",
        "Field required",
        "differs from conversation_id",
        "outside the model's vocabulary",
        "the limit is 8",
        "open or close chat turns",
        "exactly one of token_ids and text",
    ]
    expected = {value.decode(): reason for (_, value), reason in zip(bad, reasons, strict=True)}
    assert sorted(letter["value"] for letter in letters) == sorted(expected)
    for letter in letters:
        assert expected[letter["value"]] in letter["reason"]
    # Kafka orders per partition: one key's letters keep the order of their records.
    assert [letter["value"] for letter in letters if letter["key"] == "x"] == [
        value.decode() for key, value in bad if key == b"x"
    ]
    assert all(
        letter["topic"] == config.tokens_topic and letter["worker"] == "worker-a" for letter in letters
    )
    assert any(v.kind == "tokens" for v in verdicts.verdicts())


async def test_two_workers_split_the_partitions(tiny_model, settings, redis_prefix):
    first, second = settings(worker_id="worker-a"), settings(worker_id="worker-b")
    special = special_token_ids(tiny_model.tokenizer)
    conversations = {
        f"split-{i}": encode_turns(tiny_model, CONVERSATIONS[i % len(CONVERSATIONS)]) for i in range(12)
    }
    async with running_worker(first, tiny_model), running_worker(second, tiny_model):
        await wait_for_group(first.kafka_bootstrap, first.group_id, members=2)
        async with GuardProducer(first.kafka_bootstrap, first.tokens_topic) as producer:
            await stream_interleaved(producer, conversations, text=False, seed=3)
        collected = await collect(
            first.kafka_bootstrap, first.verdicts_topic, ended(conversations), timeout=60
        )
    verdicts = collected.verdicts()
    for conversation_id, turns in conversations.items():
        streamed = streamed_token_labels(verdicts, conversation_id)
        assert_labels_match(streamed, expected_token_labels(tiny_model, render_conversation(turns, special)))
    redis = first.redis_client()
    try:
        owners = {(await redis.hget(f"{redis_prefix}session:{{{cid}}}", "owner")) for cid in conversations}
    finally:
        await redis.aclose()
    assert owners == {b"worker-a", b"worker-b"}


def _expected_first_alert(model, token_ids, content_positions, policy):
    """First assistant content position where it and the content token before it in the turn are
    both flagged under the policy (the report's debounce), from a whole-conversation score."""
    flagged_levels = {"Unsafe", "Controversial"} if policy == "strict" else {"Unsafe"}
    verdicts = score_ids(model, token_ids)
    previous = False
    for position in content_positions:
        flagged = verdicts[position].risk_level in flagged_levels
        if flagged and previous:
            return position
        previous = flagged
    return None


@pytest.mark.parametrize("policy", ["strict", "loose"])
async def test_policy_and_debounced_alert_match_the_scores(tiny_model, settings, policy):
    config = settings(policy=policy)
    special = special_token_ids(tiny_model.tokenizer)
    user = tiny_model.tokenizer.encode("Tell me a long story.", add_special_tokens=False)
    answer = tiny_model.tokenizer.encode(
        "Once upon a time a dragon guarded a bridge, and every traveller paid in songs and riddles.",
        add_special_tokens=False,
    )
    conversations = {"alert-0": [("user", user), ("assistant", answer)]}
    token_ids = render_conversation(conversations["alert-0"], special)
    assistant_positions = _content_positions(conversations["alert-0"], special)[len(user) :]
    expected = _expected_first_alert(tiny_model, token_ids, assistant_positions, policy)
    async with running_worker(config, tiny_model):
        async with GuardProducer(config.kafka_bootstrap, config.tokens_topic) as producer:
            await stream_interleaved(producer, conversations, text=False)
        collected = await collect(config.kafka_bootstrap, config.verdicts_topic, ended(conversations))
    assistant_alerts = [
        v for v in collected.verdicts() if v.alert and v.role == "assistant" and v.kind == "tokens"
    ]
    assert expected is not None, "the random test model flags some pair of tokens under either policy"
    assert [v.alert_position for v in assistant_alerts] == [expected], "exactly one alert, at the first pair"
    for verdict in collected.verdicts():
        if verdict.kind == "tokens" and verdict.risk_level is not None:
            assert verdict.risk_level in {"Safe", "Unsafe"}, "summaries are read under the policy"


@pytest.mark.parametrize("interval_ms", [0, 1000])
async def test_step_interval_gathers_a_trickle_into_few_steps(tiny_model, settings, interval_ms):
    """Events 100 ms apart: without an interval each gets a step of its own (its verdict queued on its
    own); with a 1 s interval the 2 s trickle goes in a handful of steps. A step's verdicts are queued
    in one call, so their record timestamps sit together; steps are told apart by gaps of 50 ms."""
    worker = settings(step_interval_ms=interval_ms)
    conversation_id, events = "trickle", 20

    def event(seq: int) -> bytes:
        body = {"conversation_id": conversation_id, "seq": seq, "role": "assistant", "token_ids": [100 + seq]}
        return json.dumps(body).encode()

    producer = AIOKafkaProducer(bootstrap_servers=worker.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        async with running_worker(worker, tiny_model):
            # The first event's verdict says the worker has joined and stepped: the trickle starts then.
            await producer.send_and_wait(worker.tokens_topic, event(0), key=conversation_id.encode())
            await collect(worker.kafka_bootstrap, worker.verdicts_topic, lambda c: len(c.records) >= 1)
            for seq in range(1, events + 1):
                await producer.send_and_wait(worker.tokens_topic, event(seq), key=conversation_id.encode())
                await asyncio.sleep(0.1)
            collected = await collect(
                worker.kafka_bootstrap, worker.verdicts_topic, lambda c: len(c.records) >= events + 1
            )
    finally:
        await producer.stop()
    assert [verdict.seq for verdict in collected.verdicts()] == list(range(events + 1))
    stamps = sorted(collected.timestamps[1:])
    steps = 1 + sum(1 for earlier, later in itertools.pairwise(stamps) if later - earlier > 50)
    if interval_ms:
        assert steps <= 5, f"{steps} steps for a 2 s trickle with a 1 s interval"
    else:
        assert steps >= 10, f"only {steps} steps for events 100 ms apart: the control does not separate them"
