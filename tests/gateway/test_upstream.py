"""The upstream client against a real HTTP server: many replies streaming at once."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from processor.gateway.upstream import Delta, Finished, Upstream

CONCURRENT_REPLIES = 150  # more than aiohttp's default connection pool (100)


@pytest.mark.timeout(60)
async def test_concurrent_replies_are_not_queued_behind_a_connection_pool() -> None:
    """Every reply starts streaming while all the others are still open, as long replies do."""
    in_flight = 0
    all_in = asyncio.Event()

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight
        in_flight += 1
        if in_flight == CONCURRENT_REPLIES:
            all_in.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await all_in.wait()  # a reply ends only once every request has reached the server
        chunk = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = Upstream(f"http://127.0.0.1:{runner.addresses[0][1]}/v1", None, timeout_s=30)
    await upstream.start()

    async def one_reply() -> list[Delta | Finished]:
        return [item async for item in upstream.stream({"model": "m", "messages": []})]

    try:
        replies = await asyncio.wait_for(
            asyncio.gather(*(one_reply() for _ in range(CONCURRENT_REPLIES))), timeout=20
        )
    finally:
        all_in.set()  # lets the held replies end, so a failure does not wait out the server's shutdown
        await upstream.stop()
        await runner.cleanup()
    assert all(reply == [Delta("ok"), Finished("stop", None)] for reply in replies)
