"""`guardstream worker`: one flag per worker setting, then the worker until SIGTERM."""

from __future__ import annotations

import argparse
import sys

from processor.cli.settings_flags import (
    add_settings_flags,
    configure_logging,
    run_until_stopped,
    settings_from_flags,
)
from processor.worker.settings import WorkerSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker",
        help="consume token events from Kafka, publish verdicts, keep sessions in Redis",
        description="Every flag can also be set as GUARDSTREAM_<FLAG> (e.g. GUARDSTREAM_KAFKA_BOOTSTRAP).",
    )
    add_settings_flags(worker, WorkerSettings)
    worker.set_defaults(handler=worker_command)


def worker_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    settings = settings_from_flags(WorkerSettings, args)
    if not settings.model:
        print("guardstream worker: --model (or GUARDSTREAM_MODEL) is required", file=sys.stderr)
        return 2
    from processor.worker.serve import serve

    # On SIGTERM the worker finishes the step in flight, publishes, commits, then leaves the group.
    run_until_stopped(lambda stop: serve(settings, stop=stop))
    return 0
