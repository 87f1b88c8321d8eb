"""The HTTP surface: OpenAI's chat completions (streamed as server-sent events, or whole), health and
metrics, behind bearer-key auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from processor.events import CONVERSATION_ID_PATTERN
from processor.gateway.auth import OPEN_PATHS, BearerAuth, openai_error
from processor.gateway.chat import ChatFailed, ChatRelay, Finish, Released
from processor.gateway.moderation import (
    ModerationUnavailable,
    TextVerdict,
    moderate,
    moderate_replies,
    openai_result,
)
from processor.gateway.services import GatewayServices

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "X-Conversation-Id"
CONVERSATION_ECHO_HEADER = "x-guardstream-conversation-id"
# The workers' default limit on conversation ids (EventLimits.max_conversation_id_length).
MAX_CONVERSATION_ID_LENGTH = 128
_CONVERSATION_ID = re.compile(CONVERSATION_ID_PATTERN)
LITELLM_GUARDRAIL_PATH = "/beta/litellm_basic_guardrail_api"

SERVICES = web.AppKey("services", GatewayServices)
AUTH = web.AppKey("auth", BearerAuth)


def build_app(services: GatewayServices, auth: BearerAuth) -> web.Application:
    app = web.Application(middlewares=[_require_key], client_max_size=services.settings.max_request_bytes)
    app[SERVICES] = services
    app[AUTH] = auth
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post(LITELLM_GUARDRAIL_PATH, litellm_guardrail)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _require_key(request: web.Request, handler: Any) -> web.StreamResponse:
    # Checked before the body is read: a caller without a key produces nothing and reaches no upstream.
    if request.path not in OPEN_PATHS and not _has_key(request):
        request.app[SERVICES].metrics.requests.labels(
            endpoint=_endpoint(request), outcome="unauthorized"
        ).inc()
        return openai_error(
            401,
            "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
            "invalid_request_error",
            "invalid_api_key",
        )
    return await handler(request)


def _has_key(request: web.Request) -> bool:
    """`Authorization: Bearer KEY`; on LiteLLM's route also `x-api-key: KEY`, the header LiteLLM's
    generic_guardrail_api sends its configured api_key in."""
    auth = request.app[AUTH]
    if auth.allows(request.headers.get("Authorization")):
        return True
    offered = request.headers.get("x-api-key")
    return request.path == LITELLM_GUARDRAIL_PATH and offered is not None and auth.allows(f"Bearer {offered}")


def _endpoint(request: web.Request) -> str:
    """A bounded label: the route's name, never anything the caller chose."""
    known = {
        "/v1/chat/completions": "chat",
        "/v1/moderations": "moderations",
        LITELLM_GUARDRAIL_PATH: "litellm_guardrail",
    }
    return known.get(request.path, "other")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[SERVICES].router.running
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVICES].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    count = services.metrics.requests
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        count.labels(endpoint="chat", outcome="bad_request").inc()
        return openai_error(400, "The request body is not JSON.", "invalid_request_error")
    problem = _request_problem(body)
    conversation_id = request.headers.get(CONVERSATION_HEADER) or f"gs-{uuid.uuid4().hex}"
    if problem is None and not (
        len(conversation_id) <= MAX_CONVERSATION_ID_LENGTH and _CONVERSATION_ID.match(conversation_id)
    ):
        problem = (
            f"{CONVERSATION_HEADER} must be at most {MAX_CONVERSATION_ID_LENGTH} characters of "
            "A-Z a-z 0-9 . _ : @ + = / -"
        )
    if problem is not None:
        count.labels(endpoint="chat", outcome="bad_request").inc()
        return openai_error(400, problem, "invalid_request_error")
    relay = ChatRelay(services, conversation_id, body)
    shape = _Completion(body.get("model") or services.checkpoint.name)
    headers = {CONVERSATION_ECHO_HEADER: conversation_id}
    try:
        if body.get("stream"):
            response = await _stream(request, relay, shape, headers)
        else:
            response = await _whole(relay, shape, headers)
    except asyncio.CancelledError:  # the caller went away: the relay has cancelled the upstream
        count.labels(endpoint="chat", outcome="disconnected").inc()
        raise
    return response


async def _json_object(request: web.Request) -> dict | None:
    """The request's JSON object; None when the body is not one."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


# Inputs one moderation request may carry; each is a conversation for the workers.
MAX_MODERATION_INPUTS = 64


async def moderations(request: web.Request) -> web.Response:
    """OpenAI's Moderation API: `{"input": str | [str]}`, each input judged as a user prompt."""
    services = request.app[SERVICES]
    count = services.metrics.requests
    body = await _json_object(request)
    inputs = body.get("input") if body is not None else None
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts) or not texts:
        count.labels(endpoint="moderations", outcome="bad_request").inc()
        return openai_error(
            400, "'input' must be a string or a non-empty list of strings.", "invalid_request_error"
        )
    if len(texts) > MAX_MODERATION_INPUTS:
        count.labels(endpoint="moderations", outcome="bad_request").inc()
        return openai_error(
            400, f"At most {MAX_MODERATION_INPUTS} inputs a request; split the list.", "invalid_request_error"
        )
    try:
        verdicts = await moderate(services, texts)
    except ModerationUnavailable as error:
        count.labels(endpoint="moderations", outcome="unavailable").inc()
        return openai_error(503, str(error), "service_unavailable")
    categories = services.checkpoint.labels.query_categories
    count.labels(endpoint="moderations", outcome="ok").inc()
    return web.json_response(
        {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": body.get("model") or services.checkpoint.name,
            "results": [openai_result(verdict, categories) for verdict in verdicts],
        }
    )


async def litellm_guardrail(request: web.Request) -> web.Response:
    """LiteLLM's Generic Guardrail API: `texts` of a request (judged as prompts) or of a response (judged
    as replies to the request's last user message, from `structured_messages` when LiteLLM sends them)."""
    services = request.app[SERVICES]
    count = services.metrics.requests
    body = await _json_object(request)
    texts = body.get("texts") if body is not None else None
    input_type = body.get("input_type", "request") if body is not None else None
    if (
        not isinstance(texts, list)
        or not all(isinstance(text, str) for text in texts)
        or len(texts) > MAX_MODERATION_INPUTS
        or input_type not in ("request", "response")
    ):
        count.labels(endpoint="litellm_guardrail", outcome="bad_request").inc()
        return openai_error(
            400,
            f"'texts' must be a list of at most {MAX_MODERATION_INPUTS} strings and 'input_type' "
            "'request' or 'response'.",
            "invalid_request_error",
        )
    try:
        if input_type == "request":
            verdicts = await moderate(services, texts)
        else:
            prompt = _last_user_text(body.get("structured_messages"))
            verdicts = await moderate_replies(services, prompt, texts)
    except ModerationUnavailable as error:
        count.labels(endpoint="litellm_guardrail", outcome="unavailable").inc()
        return web.json_response({"action": "BLOCKED", "blocked_reason": str(error), "texts": None})
    flagged = [verdict for verdict in verdicts if verdict.flagged]
    count.labels(endpoint="litellm_guardrail", outcome="blocked" if flagged else "ok").inc()
    if flagged:
        return web.json_response(
            {"action": "BLOCKED", "blocked_reason": _blocked_reason(flagged[0]), "texts": None}
        )
    return web.json_response({"action": "NONE", "blocked_reason": None, "texts": None})


def _last_user_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if (
            isinstance(message, dict)
            and message.get("role") == "user"
            and isinstance(message.get("content"), str)
        ):
            return message["content"]
    return None


def _blocked_reason(verdict: TextVerdict) -> str:
    return f"guardstream: {verdict.risk_level} ({verdict.category or 'no category'})"


def _request_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a non-empty list of message objects."
    if body.get("n", 1) != 1:
        return "guardstream moderates one choice a request: 'n' must be 1."
    return None


class _Completion:
    """The OpenAI response shapes of one completion."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def chunk(self, delta: dict[str, Any], finish: Finish | None = None) -> str:
        document: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish.finish_reason if finish else None}
            ],
        }
        if finish is not None and finish.guardstream is not None:
            document["guardstream"] = finish.guardstream
        return orjson.dumps(document).decode()

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish.finish_reason,
                }
            ],
            "guardstream": finish.guardstream,
        }


def _outcome(finish: Finish) -> str:
    if finish.guardstream is not None and finish.finish_reason == "content_filter":
        return str(finish.guardstream.get("reason", "content_filter"))
    return "stop"


async def _stream(
    request: web.Request, relay: ChatRelay, shape: _Completion, headers: dict[str, str]
) -> web.StreamResponse:
    """Server-sent events; the response starts with the first output, so an early failure is still an
    HTTP error status."""
    count = relay.metrics.requests
    sse: EventSourceResponse | None = None
    try:
        async with contextlib.aclosing(relay.run()) as outputs:
            async for output in outputs:
                if sse is None:
                    sse = EventSourceResponse(headers=headers, allow_all_methods=True)
                    await sse.prepare(request)
                    await sse.send(shape.chunk({"role": "assistant", "content": ""}))
                if isinstance(output, Released):
                    await sse.send(shape.chunk({"content": output.text}))
                else:
                    await sse.send(shape.chunk({}, output))
                    await sse.send("[DONE]")
                    count.labels(endpoint="chat", outcome=_outcome(output)).inc()
                    break
    except ChatFailed as failure:
        count.labels(endpoint="chat", outcome=failure.error_type).inc()
        if sse is None:
            return _failure_response(failure, headers)
        error = {"message": failure.message, "type": failure.error_type, "param": None, "code": None}
        await sse.send(json.dumps({"error": error}))
    assert sse is not None
    sse.stop_streaming()
    return sse


async def _whole(relay: ChatRelay, shape: _Completion, headers: dict[str, str]) -> web.Response:
    count = relay.metrics.requests
    texts: list[str] = []
    try:
        async with contextlib.aclosing(relay.run()) as outputs:
            async for output in outputs:
                if isinstance(output, Released):
                    texts.append(output.text)
                else:
                    count.labels(endpoint="chat", outcome=_outcome(output)).inc()
                    return web.json_response(shape.whole("".join(texts), output), headers=headers)
    except ChatFailed as failure:
        count.labels(endpoint="chat", outcome=failure.error_type).inc()
        return _failure_response(failure, headers)
    raise AssertionError("the relay ended without a Finish")


def _failure_response(failure: ChatFailed, headers: dict[str, str]) -> web.Response:
    response = openai_error(failure.status, failure.message, failure.error_type)
    response.headers.update(headers)
    return response
