"""/metrics, /healthz and /readyz on one port, served by aiohttp."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    """healthz: the worker makes progress (`stall()` says why not); readyz: `is_ready()` (model loaded,
    Kafka and Redis reachable)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool],
        host: str = "0.0.0.0",
        stall: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._registry = registry
        self._is_ready = is_ready
        self._stall = stall
        self._host = host
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, port: int) -> int:
        """Serve on `port` (0: a free one); the port it serves on."""
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, port).start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        if (reason := self._stall()) is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"stalled: {reason}\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")
