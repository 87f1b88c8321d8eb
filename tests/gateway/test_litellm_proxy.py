"""LiteLLM's own proxy as the client of the gateway's Generic Guardrail API endpoint.

A `litellm --config` proxy (pyproject's `litellm` extra, in a cached environment of its own: its pins
clash with this one's) serves models whose replies are `mock_response`s, guarded by
`generic_guardrail_api` pointed at a gateway over real Kafka, Redis and a worker. The official `openai`
client calls the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from processor.gateway.serve import running_gateway
from processor.gateway.services import Checkpoint, GatewayServices
from processor.gateway.settings import GatewaySettings
from processor.local.testing import unique_name
from processor.model import load_guard_model
from processor.worker.settings import WorkerSettings
from tests.gateway.test_gateway_integration import (
    FLAGGED_PROMPT,
    SAFE_PROMPT,
    expected_release,
    random_reply,
)
from tests.side_env import PackageIndexUnreachable, extra_requirement, side_environment
from tests.worker.harness import running_worker, worker_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]  # a first run builds LiteLLM's environment

GATEWAY_KEY = "litellm-key"
MASTER_KEY = f"sk-{uuid.uuid4().hex}"  # the proxy refuses to start without one
SAFE_REPLY, FLAGGED_REPLY = random_reply(16), random_reply(19)
SAFE_MODEL, FLAGGED_MODEL = "mock-safe", "mock-flagged"
WRONG_KEY_GUARDRAIL = "guardstream-wrong-key"


def proxy_config(gateway_url: str) -> dict[str, Any]:
    """Two mocked models; the guardrail as docs/gateway.md configures it, and one with a wrong key that
    runs only when a request names it."""

    def model(name: str, reply: str) -> dict[str, Any]:
        params = {"model": f"openai/{name}", "api_key": "unused", "mock_response": reply}
        return {"model_name": name, "litellm_params": params}

    def guardrail(name: str, api_key: str, default_on: bool) -> dict[str, Any]:
        params = {
            "guardrail": "generic_guardrail_api",
            "mode": ["pre_call", "post_call"],
            "api_base": gateway_url,
            "api_key": api_key,
            "default_on": default_on,
        }
        return {"guardrail_name": name, "litellm_params": params}

    return {
        "model_list": [model(SAFE_MODEL, SAFE_REPLY), model(FLAGGED_MODEL, FLAGGED_REPLY)],
        "guardrails": [
            guardrail("guardstream", "os.environ/GUARDSTREAM_KEY", True),
            guardrail(WRONG_KEY_GUARDRAIL, f"not-{GATEWAY_KEY}", False),
        ],
    }


@pytest.fixture(scope="module")
def litellm_command() -> Path:
    try:
        python = side_environment("litellm", extra_requirement("litellm"))
    except PackageIndexUnreachable as error:
        pytest.skip(str(error))
    return python.parent / "litellm"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_guard_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
async def worker(kafka_bootstrap, redis_url, tiny_model) -> AsyncIterator[WorkerSettings]:
    prefix = unique_name("gs-test", "litellm")
    settings = worker_settings(kafka_bootstrap, redis_url, prefix, prefix.replace(".", ":") + ":")
    async with running_worker(settings, tiny_model):
        yield settings


@pytest.fixture(scope="module")
async def stack(
    litellm_command, worker, tiny_model_dir, tmp_path_factory
) -> AsyncIterator[tuple[openai.AsyncOpenAI, GatewayServices]]:
    """(a client of the LiteLLM proxy, the services of the gateway it guards with)."""
    home = tmp_path_factory.mktemp("litellm")
    keys = home / "gateway-keys"
    keys.write_text(f"{GATEWAY_KEY}\n")
    settings = GatewaySettings(
        listen="127.0.0.1:0",
        kafka_bootstrap=worker.kafka_bootstrap,
        tokens_topic=worker.tokens_topic,
        verdicts_topic=worker.verdicts_topic,
        verdict_timeout=10.0,
        api_keys=str(keys),
    )
    async with (
        running_gateway(settings, Checkpoint.load(str(tiny_model_dir))) as (gateway_url, services),
        litellm_proxy(litellm_command, gateway_url, home) as proxy_url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key=MASTER_KEY, max_retries=0)
        try:
            yield client, services
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def litellm_proxy(command: Path, gateway_url: str, home: Path) -> AsyncIterator[str]:
    """The URL of a LiteLLM proxy on a free loopback port, killed (with its process group) at the end."""
    config = home / "config.yaml"
    config.write_text(json.dumps(proxy_config(gateway_url)))  # JSON is YAML
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "GUARDSTREAM_KEY": GATEWAY_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from GitHub at start
    }
    log = home / "proxy.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            cwd=home,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await _until_live(process, f"{url}/health/liveliness", log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 15)


async def _until_live(process: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"litellm exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"litellm not live within {timeout} s:\n{log.read_text()[-4000:]}")
            await asyncio.sleep(0.25)


def guardrail_calls(services: GatewayServices) -> dict[str, float]:
    """The gateway's count of LiteLLM guardrail calls, by outcome."""
    registry = services.metrics.registry
    return {
        outcome: registry.get_sample_value(
            "guardstream_gateway_requests_total", {"endpoint": "litellm_guardrail", "outcome": outcome}
        )
        or 0.0
        for outcome in ("ok", "blocked", "unauthorized", "bad_request", "unavailable")
    }


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {outcome: count - before[outcome] for outcome, count in after.items() if count != before[outcome]}


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def test_litellm_blocks_what_the_workers_flag_and_passes_the_rest(stack, tiny_model) -> None:
    client, services = stack
    # LiteLLM sends a response's texts without the conversation, so a reply is judged on its own; these
    # two judge the same after the prompt as well.
    for prompt in ([], SAFE_PROMPT):
        assert expected_release(tiny_model, prompt, SAFE_REPLY).finish_reason == "stop"
        assert expected_release(tiny_model, prompt, FLAGGED_REPLY).finish_reason == "content_filter"

    before = guardrail_calls(services)
    completion = await client.chat.completions.create(model=SAFE_MODEL, messages=user(SAFE_PROMPT))
    assert completion.choices[0].message.content == SAFE_REPLY
    assert grown(before, guardrail_calls(services)) == {"ok": 2}, "the prompt and the reply passed"

    before = guardrail_calls(services)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=SAFE_MODEL, messages=user(FLAGGED_PROMPT))
    assert "guardstream: Unsafe" in raised.value.message
    assert grown(before, guardrail_calls(services)) == {"blocked": 1}, "blocked before any reply"

    before = guardrail_calls(services)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=FLAGGED_MODEL, messages=user(SAFE_PROMPT))
    assert "guardstream: Unsafe" in raised.value.message
    assert grown(before, guardrail_calls(services)) == {"ok": 1, "blocked": 1}, "prompt passed, reply not"

    # Streamed, LiteLLM checks the text so far every few chunks and at the end; the block ends the stream
    # with an error event.
    before = guardrail_calls(services)
    text = ""
    with pytest.raises(openai.APIError) as raised:
        stream = await client.chat.completions.create(
            model=FLAGGED_MODEL, messages=user(SAFE_PROMPT), stream=True
        )
        async for chunk in stream:
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert "guardstream: Unsafe" in raised.value.message
    assert FLAGGED_REPLY.startswith(text) and text != FLAGGED_REPLY, "cut before the reply's end"
    assert grown(before, guardrail_calls(services)).get("blocked") == 1


async def test_a_wrong_key_in_litellm_fails_the_call(stack) -> None:
    client, services = stack
    before = guardrail_calls(services)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(
            model=SAFE_MODEL, messages=user(SAFE_PROMPT), extra_body={"guardrails": [WRONG_KEY_GUARDRAIL]}
        )
    assert raised.value.status_code == 500 and "401 Unauthorized" in raised.value.message
    assert grown(before, guardrail_calls(services)).get("unauthorized") == 1
