"""The health/metrics endpoint and dead-letter records."""

from __future__ import annotations

import asyncio
import base64

from processor.worker.dlq import MAX_KEPT_BYTES, dead_letter
from processor.worker.http import HealthServer
from processor.worker.metrics import WorkerMetrics


async def get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    status, _, body = response.partition("\r\n\r\n")
    return status.splitlines()[0], body


async def test_endpoints():
    metrics = WorkerMetrics()
    metrics.dead_letters.inc(3)
    ready = {"value": False}
    server = HealthServer(metrics.registry, lambda: ready["value"], host="127.0.0.1")
    port = await server.start(0)
    try:
        assert (await get(port, "/healthz"))[0].endswith("200 OK")
        assert "503" in (await get(port, "/readyz"))[0]
        ready["value"] = True
        assert (await get(port, "/readyz"))[0].endswith("200 OK")
        status, body = await get(port, "/metrics")
        assert status.endswith("200 OK") and "guardstream_dead_letters_total 3.0" in body
        assert "404" in (await get(port, "/nope"))[0]
    finally:
        await server.stop()


async def test_healthz_says_why_it_is_red():
    stall = {"reason": None}
    server = HealthServer(WorkerMetrics().registry, lambda: True, "127.0.0.1", stall=lambda: stall["reason"])
    port = await server.start(0)
    try:
        assert (await get(port, "/healthz"))[0].endswith("200 OK")
        stall["reason"] = "no step has finished for 61 s"
        status, body = await get(port, "/healthz")
        assert "503" in status and body == "stalled: no step has finished for 61 s\n"
        assert (await get(port, "/readyz"))[0].endswith("200 OK")  # readyz keeps its meaning
    finally:
        await server.stop()


def test_dead_letter_keeps_binary_and_truncates():
    letter = dead_letter("t", 1, 2, b"\xff", b"\xfe" * (MAX_KEPT_BYTES + 5), "bad", "w")
    assert letter.key_encoding == "base64" and base64.b64decode(letter.key) == b"\xff"
    assert letter.value_truncated and len(base64.b64decode(letter.value)) == MAX_KEPT_BYTES
    text = dead_letter("t", 0, 0, b"k", b'{"a": 1}', "bad", "w")
    assert text.value == '{"a": 1}' and text.value_encoding == "utf-8"
