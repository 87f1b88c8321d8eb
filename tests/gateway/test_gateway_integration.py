"""The gateway against real Kafka, Redis and an in-process worker, a stand-in upstream, and the official
`openai` client as the caller."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from processor.gateway.serve import running_gateway, serve
from processor.gateway.services import Checkpoint, GatewayServices
from processor.gateway.settings import GatewaySettings
from processor.local.testing import unique_name
from processor.model import load_guard_model
from processor.model.labels import Policy, is_flagged
from processor.model.tokenizer import content_token_ids, special_token_ids
from processor.score import score_ids
from processor.worker.serve import ensure_topics
from processor.worker.template import render_conversation
from tests.gateway.standin import Script, StandInUpstream, running_upstream
from tests.worker.harness import running_worker, worker_settings

pytestmark = pytest.mark.integration

SAFE_PROMPT = "Tell me a story."
FLAGGED_PROMPT = "Why is the sky blue?"  # the random tiny model reads it as Unsafe
WORDS = [
    "the",
    "a",
    "dragon",
    "bridge",
    "river",
    "song",
    "riddle",
    "bread",
    "flour",
    "water",
    "knife",
    "storm",
    "castle",
    "night",
    "quiet",
    "green",
    "fire",
    "ship",
    "map",
    "gold",
    "wolf",
    "lantern",
]


def random_reply(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


@dataclass(frozen=True)
class Expected:
    text: str
    finish_reason: str
    alert_position: int | None


def expected_release(model, prompt: str | list[tuple[str, str]], reply: str) -> Expected:
    """From the whole conversation's scores (strict policy): the reply up to the first flagged pair's
    first token, or all of it. `prompt` is the user's text, or the (role, text) turns before the reply
    as the workers read them (a system message is a user turn)."""
    tokenizer = model.tokenizer
    special = special_token_ids(tokenizer)
    turns = [("user", prompt)] if isinstance(prompt, str) else prompt
    answer = content_token_ids(tokenizer, reply)
    history = [(role, content_token_ids(tokenizer, text)) for role, text in turns]
    ids = render_conversation([*history, ("assistant", answer)], special)
    start = len(ids) - len(answer) - 2  # before the reply's "<|im_end|>\n"
    assert ids[start - 2 : start] == [special.end_think, special.double_newline]
    verdicts = score_ids(model, ids)[start : start + len(answer)]
    flags = [is_flagged(verdict.risk_level, Policy.STRICT) for verdict in verdicts]
    for index in range(1, len(flags)):
        if flags[index] and flags[index - 1]:
            return Expected(tokenizer.decode(answer[: index - 1]), "content_filter", verdicts[index].position)
    return Expected(reply, "stop", None)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_guard_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir) -> Checkpoint:
    return Checkpoint.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
async def worker(kafka_bootstrap, redis_url, tiny_model) -> AsyncIterator:
    """One worker for the module; each test's conversations have ids of their own."""
    prefix = unique_name("gs-test", "gateway")
    settings = worker_settings(kafka_bootstrap, redis_url, prefix, prefix.replace(".", ":") + ":")
    async with running_worker(settings, tiny_model):
        yield settings


@pytest.fixture
async def idle_topics(kafka_bootstrap, redis_url, topic_prefix, redis_prefix):
    """Topics no worker reads: every verdict is late."""
    settings = worker_settings(kafka_bootstrap, redis_url, topic_prefix, redis_prefix)
    await ensure_topics(settings)
    return settings


@pytest.fixture
def upstream() -> StandInUpstream:
    return StandInUpstream()


@pytest.fixture
def gateway(checkpoint, upstream):
    """`async with gateway(worker_settings, **settings) as (client, services)`."""

    @contextlib.asynccontextmanager
    async def start(topics, api_key: str | None = "unused", **overrides):
        async with running_upstream(upstream) as upstream_url:
            values = {
                "listen": "127.0.0.1:0",
                "upstream": upstream_url,
                "kafka_bootstrap": topics.kafka_bootstrap,
                "tokens_topic": topics.tokens_topic,
                "verdicts_topic": topics.verdicts_topic,
                "verdict_timeout": 10.0,
            }
            settings = GatewaySettings(**(values | overrides))
            async with running_gateway(settings, checkpoint) as (url, services):
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
                try:
                    yield client, services
                finally:
                    await client.close()

    return start


async def chat(
    client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool, conversation_id: str | None = None
):
    """(released text, finish_reason, guardstream object, echoed conversation id) of one completion."""
    headers = {"X-Conversation-Id": conversation_id} if conversation_id else {}
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, extra_headers=headers
        )
        completion = raw.parse()
        choice = completion.choices[0]
        extra = completion.model_extra or {}
        echoed = raw.headers.get("x-guardstream-conversation-id")
        return choice.message.content or "", choice.finish_reason, extra.get("guardstream"), echoed
    async with client.chat.completions.with_streaming_response.create(
        model=model, messages=messages, stream=True, extra_headers=headers
    ) as response:
        echoed = response.headers.get("x-guardstream-conversation-id")
        text, finish_reason, guardstream = "", None, None
        async for chunk in await response.parse():
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish_reason = choice.finish_reason or finish_reason
            guardstream = (chunk.model_extra or {}).get("guardstream") or guardstream
    return text, finish_reason, guardstream, echoed


def metric(services: GatewayServices, name: str, **labels: str) -> float:
    value = services.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


@pytest.mark.parametrize("prompt_check", ["block", "parallel"])
async def test_hold_releases_exactly_the_prefix_before_the_first_flagged_pair(
    worker, gateway, upstream, tiny_model, prompt_check
) -> None:
    seeds = range(16, 30)
    expected = {
        f"reply-{seed}": expected_release(tiny_model, SAFE_PROMPT, random_reply(seed)) for seed in seeds
    }
    assert {e.finish_reason for e in expected.values()} == {"stop", "content_filter"}, "both outcomes occur"
    for seed in seeds:
        upstream.scripts[f"reply-{seed}"] = Script(random_reply(seed), seed=seed)
    async with gateway(worker, prompt_check=prompt_check) as (client, services):
        ids = {model: f"hold-{uuid.uuid4().hex}" for model in expected}
        results = await asyncio.gather(
            *(
                chat(client, model, SAFE_PROMPT, stream=number % 2 == 0, conversation_id=ids[model])
                for number, model in enumerate(expected)
            )
        )
        for model, (text, finish_reason, guardstream, echoed) in zip(expected, results, strict=True):
            want = expected[model]
            assert (text, finish_reason) == (want.text, want.finish_reason), model
            assert echoed == ids[model]
            if want.finish_reason == "content_filter":
                assert guardstream["reason"] == "alert"
                assert guardstream["alert_position"] == want.alert_position
                assert guardstream["risk_level"] == "Unsafe"
                assert guardstream["category"]
            else:
                assert guardstream is None
        cuts = sum(e.finish_reason == "content_filter" for e in expected.values())
        categories = {labels["category"] for labels in _labels(services, "guardstream_gateway_cuts_total")}
        assert (
            categories
            and sum(metric(services, "guardstream_gateway_cuts_total", category=c) for c in categories)
            == cuts
        )
        assert metric(services, "guardstream_gateway_first_release_seconds_count") > 0
        assert metric(services, "guardstream_gateway_hold_back_seconds_count") > 0
        assert services.router.registered == 0, "every conversation unregistered"


async def test_system_messages_and_history_are_turns_the_verdicts_line_up_with(
    worker, gateway, upstream, tiny_model
) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": SAFE_PROMPT},
        {"role": "assistant", "content": "Once upon a time."},
        {"role": "user", "content": [{"type": "text", "text": "Another one, please."}]},
    ]
    turns = [
        ("user", "You are a helpful assistant."),
        ("user", SAFE_PROMPT),
        ("assistant", "Once upon a time."),
        ("user", "Another one, please."),
    ]
    replies = {f"history-{seed}": random_reply(seed) for seed in range(30, 36)}
    expected = {model: expected_release(tiny_model, turns, reply) for model, reply in replies.items()}
    assert {e.finish_reason for e in expected.values()} == {"stop", "content_filter"}, "both outcomes occur"
    for model, reply in replies.items():
        upstream.scripts[model] = Script(reply)
    async with gateway(worker) as (client, _):
        for model, want in expected.items():
            completion = await client.chat.completions.create(model=model, messages=messages)
            choice = completion.choices[0]
            assert (choice.message.content, choice.finish_reason) == (want.text, want.finish_reason), model
            if want.alert_position is not None:
                assert (completion.model_extra or {})["guardstream"]["alert_position"] == want.alert_position


def _labels(services: GatewayServices, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in services.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


async def test_live_passes_text_at_once_and_cuts_at_the_alert(worker, gateway, upstream, tiny_model) -> None:
    flagged = "river castle wolf fire storm castle map song riddle song riddle " * 3
    assert expected_release(tiny_model, SAFE_PROMPT, flagged).finish_reason == "content_filter"
    upstream.scripts["flagged"] = Script(flagged, pace_s=0.05)
    upstream.scripts["safe"] = Script(random_reply(16))
    async with gateway(worker, release="live") as (client, _):
        text, finish_reason, guardstream, _ = await chat(client, "flagged", SAFE_PROMPT, stream=True)
        assert finish_reason == "content_filter" and guardstream["reason"] == "alert"
        assert flagged.startswith(text) and len(text) < len(flagged), "cut before the reply's end"
        deadline = time.monotonic() + 5
        while upstream.cancelled != 1:
            assert time.monotonic() < deadline, "the cut cancelled the upstream"
            await asyncio.sleep(0.05)
        assert (await chat(client, "safe", SAFE_PROMPT, stream=True))[:2] == (random_reply(16), "stop")


async def test_audit_passes_everything_and_records_the_alert(worker, gateway, upstream, tiny_model) -> None:
    reply = random_reply(19)
    assert expected_release(tiny_model, SAFE_PROMPT, reply).finish_reason == "content_filter"
    upstream.scripts["flagged"] = Script(reply)
    async with gateway(worker, release="audit") as (client, services):
        text, finish_reason, guardstream, _ = await chat(client, "flagged", SAFE_PROMPT, stream=True)
        assert (text, finish_reason, guardstream) == (reply, "stop", None)
        deadline = time.monotonic() + 10
        while not _labels(services, "guardstream_gateway_audit_alerts_total"):
            assert time.monotonic() < deadline, "the alert was recorded"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("prompt_check", ["block", "parallel"])
async def test_a_flagged_prompt_gets_content_filter_and_no_text(
    worker, gateway, upstream, prompt_check
) -> None:
    upstream.scripts["any"] = Script(random_reply(16), pace_s=0.05)
    async with gateway(worker, prompt_check=prompt_check) as (client, services):
        for stream in (True, False):
            text, finish_reason, guardstream, _ = await chat(client, "any", FLAGGED_PROMPT, stream=stream)
            assert (text, finish_reason) == ("", "content_filter")
            assert guardstream["reason"] == "prompt" and guardstream["risk_level"] == "Unsafe"
        blocks = _labels(services, "guardstream_gateway_prompt_blocks_total")
        assert blocks
    if prompt_check == "block":
        assert upstream.requests == [], "the upstream is called only for a Safe prompt"
    else:
        assert len(upstream.requests) == 2, "parallel calls the upstream at once"


@pytest.mark.parametrize("prompt_check", ["block", "off"])
async def test_late_verdicts_fail_closed_with_content_filter(
    idle_topics, gateway, upstream, prompt_check
) -> None:
    async with gateway(idle_topics, verdict_timeout=1.0, prompt_check=prompt_check) as (client, services):
        for stream in (True, False):
            text, finish_reason, guardstream, _ = await chat(client, "any", SAFE_PROMPT, stream=stream)
            assert (text, finish_reason) == ("", "content_filter")
            assert guardstream["reason"] == "verdict_timeout"
            assert "--verdict-timeout" in guardstream["error"]
        assert metric(services, "guardstream_gateway_verdict_timeouts_total", fail="closed") == 2
        with pytest.raises(openai.APIStatusError) as raised:
            await client.moderations.create(input=SAFE_PROMPT)
        assert raised.value.status_code == 503 and "--verdict-timeout" in raised.value.message


async def test_moderations_through_the_openai_client(worker, gateway, checkpoint) -> None:
    async with gateway(worker) as (client, services):
        response = await client.moderations.create(input=[SAFE_PROMPT, FLAGGED_PROMPT, "hi"])
        assert [result.flagged for result in response.results] == [False, True, True]
        flagged = response.results[1]
        categories = flagged.model_dump()["categories"]
        names = set(checkpoint.labels.query_categories)
        assert names <= set(categories), "the checkpoint's own category names"
        [category] = [name for name in names if categories[name]]
        assert flagged.model_dump()["category_scores"][category] > 0
        assert (flagged.model_extra or {})["guardstream"]["risk_level"] == "Unsafe"
        single = await client.moderations.create(input=SAFE_PROMPT)
        assert [result.flagged for result in single.results] == [False]
        assert services.router.registered == 0


async def test_litellm_guardrail_api_blocks_flagged_prompts_and_replies(
    worker, gateway, tiny_model, monkeypatch
) -> None:
    monkeypatch.setenv("GATEWAY_TEST_KEYS", "other-key,litellm-key")
    flagged_reply, safe_reply = random_reply(19), random_reply(16)
    assert expected_release(tiny_model, SAFE_PROMPT, flagged_reply).finish_reason == "content_filter"
    assert expected_release(tiny_model, SAFE_PROMPT, safe_reply).finish_reason == "stop"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SAFE_PROMPT}]
    cases = [
        ("request", [SAFE_PROMPT], "NONE"),
        ("request", [SAFE_PROMPT, FLAGGED_PROMPT], "BLOCKED"),
        ("response", [safe_reply], "NONE"),
        ("response", [flagged_reply], "BLOCKED"),
    ]
    async with gateway(worker, api_key="litellm-key", api_keys="env:GATEWAY_TEST_KEYS") as (client, _):
        base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
        for input_type, texts, action in cases:
            body = {
                "texts": texts,
                "input_type": input_type,
                "litellm_call_id": str(uuid.uuid4()),
                "litellm_trace_id": str(uuid.uuid4()),
                "structured_messages": messages,
                "request_data": {},
                "additional_provider_specific_params": {},
            }
            status, document = await _post(f"{base}/beta/litellm_basic_guardrail_api", "litellm-key", body)
            assert status == 200 and document["action"] == action, (input_type, texts, document)
            assert (document["blocked_reason"] is None) == (action == "NONE")
        status, _ = await _post(f"{base}/beta/litellm_basic_guardrail_api", "wrong", {"texts": []})
        assert status == 401
        status, _ = await _post(f"{base}/beta/litellm_basic_guardrail_api", None, {"texts": []})
        assert status == 401


async def test_late_verdicts_fail_open_release_the_text(idle_topics, gateway, upstream) -> None:
    reply = "Hello there, how can I help?"
    async with gateway(idle_topics, verdict_timeout=1.0, fail="open") as (client, services):
        for stream in (True, False):
            assert (await chat(client, "any", SAFE_PROMPT, stream=stream))[:3] == (reply, "stop", None)
        assert metric(services, "guardstream_gateway_verdict_timeouts_total", fail="open") == 2
        assert metric(services, "guardstream_gateway_fail_open_releases_total") > 0
        moderation = await client.moderations.create(input=SAFE_PROMPT)
        assert moderation.results[0].flagged is False
        assert "--verdict-timeout" in (moderation.results[0].model_extra or {})["guardstream"]["error"]


async def test_upstream_failures_reach_the_caller_as_errors(worker, gateway, upstream) -> None:
    upstream.scripts["status"] = Script(status=500)
    upstream.scripts["broken"] = Script(break_after=3)
    upstream.scripts["stalled"] = Script(stall_after=2)
    async with gateway(worker, upstream_timeout=1.0) as (client, services):
        for stream in (True, False):
            with pytest.raises(openai.APIStatusError) as raised:
                await chat(client, "status", SAFE_PROMPT, stream=stream)
            assert raised.value.status_code == 502 and "500" in raised.value.message
            for model in ("broken", "stalled"):
                with pytest.raises(openai.APIError):
                    await chat(client, model, SAFE_PROMPT, stream=stream)
        assert metric(services, "guardstream_gateway_upstream_errors_total") == 6
        assert services.router.registered == 0


async def test_a_caller_that_leaves_cancels_the_upstream(worker, gateway, upstream) -> None:
    upstream.scripts["slow"] = Script("a long and slow reply " * 20, pace_s=0.05)
    async with gateway(worker, release="live") as (client, services):
        async with client.chat.completions.with_streaming_response.create(
            model="slow", messages=[{"role": "user", "content": SAFE_PROMPT}], stream=True
        ) as response:
            async for _ in await response.parse():
                break
        deadline = time.monotonic() + 5
        while upstream.cancelled == 0 or services.router.registered:
            assert time.monotonic() < deadline, "upstream cancelled and the conversation unregistered"
            await asyncio.sleep(0.05)
        assert upstream.completed == 0


async def test_a_stopping_gateway_finishes_the_replies_in_flight(
    worker, checkpoint, upstream, tiny_model
) -> None:
    """A rolling update's SIGTERM: the gateway stops taking requests and lets the streams it serves end."""
    reply = random_reply(16)
    expected = expected_release(tiny_model, SAFE_PROMPT, reply)
    upstream.scripts["slow"] = Script(reply, pace_s=0.1)
    stopping = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve_until_stopped(upstream_url: str) -> None:
        settings = GatewaySettings(
            listen="127.0.0.1:0",
            upstream=upstream_url,
            kafka_bootstrap=worker.kafka_bootstrap,
            tokens_topic=worker.tokens_topic,
            verdicts_topic=worker.verdicts_topic,
            verdict_timeout=10.0,
        )
        async with running_gateway(settings, checkpoint) as (url, _):
            started.set_result(url)
            await stopping.wait()

    async with running_upstream(upstream) as upstream_url:
        server = asyncio.create_task(serve_until_stopped(upstream_url))
        client = openai.AsyncOpenAI(base_url=f"{await started}/v1", api_key="unused", max_retries=0)
        text, finish_reason = "", None
        async with client.chat.completions.with_streaming_response.create(
            model="slow", messages=[{"role": "user", "content": SAFE_PROMPT}], stream=True
        ) as response:
            async for chunk in await response.parse():
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish_reason = choice.finish_reason or finish_reason
                if text and not stopping.is_set():
                    stopping.set()  # the stop begins with this reply in flight
                    await asyncio.sleep(0.2)
                    assert not server.done()
        assert stopping.is_set() and (text, finish_reason) == (expected.text, expected.finish_reason)
        await asyncio.wait_for(server, timeout=30)
        with pytest.raises(openai.APIConnectionError):
            await chat(client, "slow", SAFE_PROMPT, stream=True)
        await client.close()


async def test_a_serving_gateway_keeps_its_long_lived_heap_from_the_collector(
    idle_topics, tiny_model_dir
) -> None:
    """Its imports (torch among them) are frozen out of the collector: a full collection would stall
    the one loop that serves every stream."""
    settings = GatewaySettings(
        listen="127.0.0.1:0",
        model=str(tiny_model_dir),
        kafka_bootstrap=idle_topics.kafka_bootstrap,
        tokens_topic=idle_topics.tokens_topic,
        verdicts_topic=idle_topics.verdicts_topic,
    )
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, stop))
    deadline = time.monotonic() + 60
    while gc.get_freeze_count() == 0:
        assert not server.done() and time.monotonic() < deadline, "the gateway froze its heap once serving"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(server, timeout=30)
    assert gc.get_freeze_count() == 0, "unfrozen at the stop"


async def test_a_conversation_id_in_progress_is_refused(worker, gateway, upstream) -> None:
    upstream.scripts["slow"] = Script("a slow reply " * 10, pace_s=0.05)
    same = f"same-{uuid.uuid4().hex}"
    async with gateway(worker) as (client, services):
        first = asyncio.create_task(chat(client, "slow", SAFE_PROMPT, stream=True, conversation_id=same))
        while services.router.registered == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.ConflictError):
            await chat(client, "slow", SAFE_PROMPT, stream=False, conversation_id=same)
        _, finish_reason, _, echoed = await first
        assert finish_reason in ("stop", "content_filter") and echoed == same
        with pytest.raises(openai.BadRequestError):
            await chat(client, "slow", SAFE_PROMPT, stream=False, conversation_id="has space")


async def test_only_callers_with_a_key_get_in(idle_topics, gateway, upstream, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# callers\nkey-one\nkey-two\n")
    reply = "Hello there, how can I help?"
    # audit: the right key's reply passes without waiting for the verdicts no worker gives here.
    open_settings = {"release": "audit", "prompt_check": "off", "fail": "open", "verdict_timeout": 1.0}
    async with gateway(idle_topics, api_keys=str(keys), **open_settings) as (
        client,
        services,
    ):
        base = str(client.base_url).rstrip("/")
        litellm = base.removesuffix("/v1") + "/beta/litellm_basic_guardrail_api"
        for url in (f"{base}/chat/completions", f"{base}/moderations", litellm):
            status, document = await _post(url, None)
            assert status == 401 and document["error"]["code"] == "invalid_api_key"
            status, _ = await _post(url, "key-wrong")
            assert status == 401
        # LiteLLM's header, taken on its route only.
        assert (await _post(litellm, None, headers={"x-api-key": "key-wrong"}))[0] == 401
        assert (await _post(f"{base}/moderations", None, headers={"x-api-key": "key-one"}))[0] == 401
        for api_key in ("key-wrong", "key-one-and-more", "key-on"):
            caller = openai.AsyncOpenAI(base_url=base, api_key=api_key, max_retries=0)
            for stream in (True, False):
                with pytest.raises(openai.AuthenticationError) as raised:
                    await chat(caller, "any", SAFE_PROMPT, stream=stream)
                assert raised.value.status_code == 401
                assert raised.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await caller.moderations.create(input=SAFE_PROMPT)
            await caller.close()
        assert upstream.requests == [], "no call without a right key reaches the upstream"
        assert await _records(idle_topics) == 0, "nothing produced without a right key"
        for api_key in ("key-one", "key-two"):
            caller = openai.AsyncOpenAI(base_url=base, api_key=api_key, max_retries=0)
            assert (await chat(caller, "any", SAFE_PROMPT, stream=True))[:2] == (reply, "stop")
            assert len((await caller.moderations.create(input=SAFE_PROMPT)).results) == 1
            await caller.close()
        request = {"texts": [SAFE_PROMPT], "input_type": "request"}
        status, document = await _post(litellm, None, body=request, headers={"x-api-key": "key-two"})
        assert status == 200 and document["action"] in ("NONE", "BLOCKED")
        status, document = await _post(litellm, "key-one", body=request)
        assert status == 200 and document["action"] in ("NONE", "BLOCKED")
        assert await _records(idle_topics) > 0
        unauthorized = {"endpoint": "chat", "outcome": "unauthorized"}
        assert metric(services, "guardstream_gateway_requests_total", **unauthorized) == 8
        unauthorized["endpoint"] = "moderations"
        assert metric(services, "guardstream_gateway_requests_total", **unauthorized) == 6
        unauthorized["endpoint"] = "litellm_guardrail"
        assert metric(services, "guardstream_gateway_requests_total", **unauthorized) == 3
        status, _ = await _post(f"{base}/chat/completions", "key-one", body=b"not json")
        assert status == 400
        exposition = (await _get(base.removesuffix("/v1") + "/metrics")).decode()
        assert "key-one" not in exposition and "key-two" not in exposition
        health = (await _get(base.removesuffix("/v1") + "/healthz")).decode()
        assert "ok" in health


async def _post(
    url: str, api_key: str | None, body: bytes | dict = b"{}", headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    import aiohttp

    headers = (headers or {}) | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as response:
        return response.status, await response.json()


async def _get(url: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.read()


async def _records(settings) -> int:
    """Records ever produced to the tokens topic (the sum of its partitions' end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.tokens_topic, number) for number in range(settings.partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()
