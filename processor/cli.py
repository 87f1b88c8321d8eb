"""The `guardstream` command: one entry point, each subcommand defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module here exposes `register(subparsers)`; importing lazily keeps `guardstream local up`
# from paying for torch.
_COMMAND_MODULES = (
    "processor.local.commands",
    "processor.model.commands",
    "processor.worker.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardstream",
        description="Real-time Qwen3Guard-Stream moderation over Kafka, with session state in Redis.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
