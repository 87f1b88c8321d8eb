"""The upstream LLM: one streamed chat completion, read as text deltas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


class UpstreamError(Exception):
    """The upstream failed: an HTTP error status, a broken stream, or silence past the timeout."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str | None
    model: str | None


class Upstream:
    """Calls `{base_url}/chat/completions` with `stream: true`, whatever the caller asked for: the gateway
    moderates the reply as it is generated, and builds a non-streamed answer itself."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No total limit: a long reply may stream for minutes. Silence is what fails it.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection limit: aiohttp's default pool of 100 would queue the 101st concurrent reply
        # behind replies that stream for seconds. The upstream server queues its own work.
        self._session = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[Delta | Finished]:
        """Text deltas of choice 0, then one Finished. Raises UpstreamError."""
        assert self._session is not None, "start() first"
        body = {key: value for key, value in request.items() if key not in ("stream", "stream_options", "n")}
        body["stream"] = True
        finish_reason: str | None = None
        model: str | None = None
        try:
            async with self._session.post(self.url, json=body, headers=self._headers) as response:
                if response.status != 200:
                    detail = (await response.text())[:500]
                    raise UpstreamError(f"upstream answered {response.status}: {detail}", response.status)
                async for line in response.content:
                    data = _sse_data(line)
                    if data is None:
                        continue
                    if data == b"[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise UpstreamError(f"upstream error: {json.dumps(chunk['error'])[:500]}")
                    model = chunk.get("model", model)
                    for choice in chunk.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield Delta(text)
                        finish_reason = choice.get("finish_reason") or finish_reason
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as error:
            raise UpstreamError(f"upstream request failed: {type(error).__name__}: {error}") from error
        yield Finished(finish_reason, model)


def _sse_data(line: bytes) -> bytes | None:
    """The payload of an SSE `data:` line; None for other lines (comments, event names, blanks)."""
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip(b" \r\n")
