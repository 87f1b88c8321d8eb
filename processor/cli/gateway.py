"""`guardstream gateway`: one flag per gateway setting, then the gateway until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import typing

from pydantic import ValidationError

from processor.cli.worker import _choices, _shown_default
from processor.gateway.settings import GatewaySettings


def register(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser(
        "gateway",
        help="an OpenAI-compatible proxy that releases only the LLM text the verdicts cleared",
        description="Every flag can also be set as GUARDSTREAM_GATEWAY_<FLAG> "
        "(e.g. GUARDSTREAM_GATEWAY_UPSTREAM). See docs/gateway.md.",
    )
    for name, field in GatewaySettings.model_fields.items():
        described = " ".join(filter(None, [field.description, _shown_default(field)]))
        options: dict[str, typing.Any] = {"default": argparse.SUPPRESS, "help": described.replace("%", "%%")}
        if field.annotation is bool:
            options["action"] = "store_true"
        elif choices := _choices(field.annotation):
            options["choices"] = choices
        gateway.add_argument("--" + name.replace("_", "-"), dest=name, **options)
    gateway.add_argument("--log-level", default="INFO")
    gateway.set_defaults(handler=gateway_command)


def gateway_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    flags = {name: getattr(args, name) for name in GatewaySettings.model_fields if hasattr(args, name)}
    try:
        settings = GatewaySettings(**flags)
    except ValidationError as error:
        print(f"guardstream gateway: {error}", file=sys.stderr)
        return 2
    if not settings.model:
        print("guardstream gateway: --model (or GUARDSTREAM_GATEWAY_MODEL) is required", file=sys.stderr)
        return 2
    from processor.gateway.serve import serve

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except ValueError as error:  # settings that must not start: say which and how to fix it
        print(f"guardstream gateway: {error}", file=sys.stderr)
        return 2
    return 0
