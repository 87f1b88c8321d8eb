"""The `guardstream` command: one entry point, a module per area registering its subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> the module that registers it (`register(subparsers)`). Only the module of the command
# being run is imported, so `guardstream local up` does not pay for importing torch.
COMMAND_MODULES = {
    "local": "processor.cli.local",
    "make-test-model": "processor.cli.model",
    "score": "processor.cli.model",
    "worker": "processor.cli.worker",
    "produce": "processor.cli.client",
    "verdicts": "processor.cli.client",
    "gateway": "processor.cli.gateway",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command`, or for every command (help, or an unknown command)."""
    parser = argparse.ArgumentParser(
        prog="guardstream",
        description="Real-time Qwen3Guard-Stream moderation over Kafka, with session state in Redis.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for module_name in dict.fromkeys(wanted):
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.handler(args) or 0)
