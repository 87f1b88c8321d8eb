"""`guardstream gateway`: one flag per gateway setting, then the gateway until SIGTERM."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from processor.cli.settings_flags import (
    add_settings_flags,
    configure_logging,
    run_until_stopped,
    settings_from_flags,
)
from processor.gateway.settings import GatewaySettings


def register(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser(
        "gateway",
        help="an OpenAI-compatible proxy that releases only the LLM text the verdicts cleared",
        description="Every flag can also be set as GUARDSTREAM_GATEWAY_<FLAG> "
        "(e.g. GUARDSTREAM_GATEWAY_UPSTREAM). See docs/gateway.md.",
    )
    add_settings_flags(gateway, GatewaySettings)
    gateway.set_defaults(handler=gateway_command)


def gateway_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        settings = settings_from_flags(GatewaySettings, args)
    except ValidationError as error:
        print(f"guardstream gateway: {error}", file=sys.stderr)
        return 2
    if not settings.model:
        print("guardstream gateway: --model (or GUARDSTREAM_GATEWAY_MODEL) is required", file=sys.stderr)
        return 2
    from processor.gateway.serve import serve

    try:
        run_until_stopped(lambda stop: serve(settings, stop))
    except ValueError as error:  # settings that must not start: say which and how to fix it
        print(f"guardstream gateway: {error}", file=sys.stderr)
        return 2
    return 0
