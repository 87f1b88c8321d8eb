"""Start and stop a gateway: its services, then the HTTP server (handlers cancelled when a caller leaves)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from processor.gateway.app import build_app
from processor.gateway.auth import BearerAuth
from processor.gateway.services import Checkpoint, GatewayServices
from processor.gateway.settings import GatewaySettings
from processor.heap import long_lived_heap_frozen

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, checkpoint: Checkpoint | None = None
) -> AsyncIterator[tuple[str, GatewayServices]]:
    """(base URL, services) of a gateway serving until the block ends. Raises ValueError for settings
    that must not start (keys missing, an exposed address without keys)."""
    keys = settings.load_api_keys()
    settings.check_exposure(bool(keys))
    if not keys:
        log.warning(
            "no --api-keys: anyone who can reach %s may call the gateway%s",
            settings.listen,
            " (--insecure-no-auth)" if settings.insecure_no_auth else " (loopback only)",
        )
    services = GatewayServices(settings, checkpoint or Checkpoint.load(settings.model))
    await services.start()
    # handler_cancellation: a caller that disconnects cancels its handler, and so its upstream call.
    runner = web.AppRunner(build_app(services, BearerAuth(keys)), handler_cancellation=True)
    try:
        await runner.setup()
        host, port = settings.host_port
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        log.info(
            "gateway on %s: release %s, prompt check %s, upstream %s",
            url,
            settings.release,
            settings.prompt_check,
            settings.upstream,
        )
        yield url, services
    finally:
        await runner.cleanup()
        await services.stop()


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    log.info("gateway settings: %s", settings.redacted())
    async with running_gateway(settings):
        # The tokenizer's and libraries' objects (torch comes with transformers): never walked again, so
        # no full collection stalls the loop that serves every stream.
        with long_lived_heap_frozen():
            await stop.wait()
