"""What the long-running commands share: one flag per settings field, logging, and running until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import signal
import typing
from collections.abc import Awaitable, Callable

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

SettingsType = typing.TypeVar("SettingsType", bound=BaseSettings)


def add_settings_flags(parser: argparse.ArgumentParser, settings_type: type[BaseSettings]) -> None:
    """One flag per settings field; unset flags leave the environment (or default) in charge."""
    for name, field in settings_type.model_fields.items():
        described = " ".join(filter(None, [field.description, _shown_default(field)]))
        # argparse %-formats help texts: a literal % in a description must reach it doubled.
        options: dict[str, typing.Any] = {"default": argparse.SUPPRESS, "help": described.replace("%", "%%")}
        if field.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif choices := _choices(field.annotation):
            options["choices"] = choices
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **options)
    parser.add_argument("--log-level", default="INFO")


def settings_from_flags(settings_type: type[SettingsType], args: argparse.Namespace) -> SettingsType:
    """The settings: flags given, over the environment, over the defaults."""
    return settings_type(
        **{name: getattr(args, name) for name in settings_type.model_fields if hasattr(args, name)}
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_until_stopped(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `serve(stop)`; SIGTERM or SIGINT sets `stop`, and `serve` drains what it holds and returns."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    asyncio.run(main())


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
