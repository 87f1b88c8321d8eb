"""A stand-in OpenAI-compatible upstream: streams a scripted reply at a set pace, or fails as scripted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp_sse import EventSourceResponse


@dataclass
class Script:
    reply: str = "Hello there, how can I help?"
    pace_s: float = 0.005  # between deltas
    status: int = 200
    break_after: int | None = None  # deltas sent before the connection is dropped
    stall_after: int | None = None  # deltas sent before the upstream goes silent
    seed: int = 0

    def pieces(self) -> list[str]:
        """The reply in random pieces of 1-4 characters, as an LLM's deltas come."""
        rng = random.Random(self.seed)
        pieces, start = [], 0
        while start < len(self.reply):
            size = rng.randint(1, 4)
            pieces.append(self.reply[start : start + size])
            start += size
        return pieces


@dataclass
class StandInUpstream:
    """Scripts are chosen by the request's `model`; unknown models get the default script."""

    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    cancelled: int = 0  # streams whose caller went away before the end
    completed: int = 0

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        script = self.scripts.get(body.get("model", ""), Script())
        if script.status != 200:
            error = {"message": "scripted failure", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=script.status)
        assert body.get("stream") is True, "the gateway always streams from the upstream"
        sse = EventSourceResponse(allow_all_methods=True)
        await sse.prepare(request)
        try:
            for number, piece in enumerate(script.pieces()):
                if number == script.break_after:
                    assert request.transport is not None
                    request.transport.close()
                    return sse
                if number == script.stall_after:
                    await asyncio.sleep(3600)
                await sse.send(json.dumps(_chunk(body, {"content": piece}, None)))
                await asyncio.sleep(script.pace_s)
            await sse.send(json.dumps(_chunk(body, {}, "stop")))
            await sse.send("[DONE]")
            self.completed += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        sse.stop_streaming()
        return sse


def _chunk(body: dict, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", ""),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


@contextlib.asynccontextmanager
async def running_upstream(upstream: StandInUpstream) -> AsyncIterator[str]:
    """The stand-in's base URL (…/v1) while the block runs."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.chat_completions)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()
