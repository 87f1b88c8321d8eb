"""`guardstream worker`: one flag per worker setting, then the worker until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import signal
import sys
import typing

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from processor.worker.settings import WorkerSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker",
        help="consume token events from Kafka, publish verdicts, keep sessions in Redis",
        description="Every flag can also be set as GUARDSTREAM_<FLAG> (e.g. GUARDSTREAM_KAFKA_BOOTSTRAP).",
    )
    _add_settings_flags(worker)
    worker.add_argument("--log-level", default="INFO")
    worker.set_defaults(handler=worker_command)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per WorkerSettings field; unset flags leave the environment (or default) in charge."""
    for name, field in WorkerSettings.model_fields.items():
        described = " ".join(filter(None, [field.description, _shown_default(field)]))
        # argparse %-formats help texts: a literal % in a description must reach it doubled.
        options: dict[str, typing.Any] = {"default": argparse.SUPPRESS, "help": described.replace("%", "%%")}
        choices = _choices(field.annotation)
        if choices:
            options["choices"] = choices
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **options)


def _shown_default(field: FieldInfo) -> str | None:
    """ "(default: X)" for a fixed default; None for a computed one or none (the description says)."""
    default = field.default
    if field.default_factory is not None or default in (None, "") or default is PydanticUndefined:
        return None
    return f"(default: {default.value if isinstance(default, enum.Enum) else default})"


def _choices(annotation: typing.Any) -> list[str] | None:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(arg) for arg in args]
    if len(args) == 1 and annotation is not SecretStr:
        return _choices(args[0])
    return None


def build_worker_settings(args: argparse.Namespace) -> WorkerSettings:
    flags = {name: getattr(args, name) for name in WorkerSettings.model_fields if hasattr(args, name)}
    return WorkerSettings(**flags)


def worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = build_worker_settings(args)
    if not settings.model:
        print("guardstream worker: --model (or GUARDSTREAM_MODEL) is required", file=sys.stderr)
        return 2
    from processor.worker.serve import serve

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Finish the step in flight, publish, commit, then leave the group.
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop=stop)

    asyncio.run(main())
    return 0
