"""`guardstream local up|down|status`: real Kafka and Redis on this machine, no Docker needed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from processor.local import services

DEFAULT_STATE_DIR = ".guardstream"


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(DEFAULT_STATE_DIR),
        help="folder for pids, data and logs (default: ./.guardstream)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    local = subparsers.add_parser("local", help="run Kafka and Redis locally (no Docker)")
    actions = local.add_subparsers(dest="local_command", required=True)

    up_parser = actions.add_parser("up", help="start (or reuse) local Kafka and Redis; prints their env")
    _add_state_dir(up_parser)
    up_parser.add_argument(
        "--kafka-port", type=int, default=None, help="broker port (default: a free one; a cluster's first)"
    )
    up_parser.add_argument(
        "--brokers",
        type=_positive,
        default=None,
        help="Kafka nodes, each a broker and a controller; 3 gives topics 3 copies, 2 in sync "
        "(default: as many as last time in this state folder, else 1)",
    )
    up_parser.add_argument(
        "--redis-port", type=int, default=None, help="redis port (default: a free one; a cluster's first)"
    )
    up_parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a Redis Cluster (3 primaries, a replica each) instead of one Redis; run the worker "
        "with --redis-cluster",
    )
    up_parser.set_defaults(handler=_up)

    down_parser = actions.add_parser("down", help="stop the services `up` started in this state folder")
    _add_state_dir(down_parser)
    down_parser.set_defaults(handler=_down)

    status_parser = actions.add_parser("status", help="show whether the services are running")
    _add_state_dir(status_parser)
    status_parser.set_defaults(handler=_status)


def _up(args: argparse.Namespace) -> int:
    began = time.monotonic()
    try:
        result = services.up(
            args.state_dir,
            kafka_port=args.kafka_port,
            redis_port=args.redis_port,
            redis_cluster=args.redis_cluster,
            brokers=args.brokers,
        )
    except services.ServiceError as error:
        print(f"guardstream local up: {error}", file=sys.stderr)
        return 1
    verb = "already running" if result.reused else f"started in {time.monotonic() - began:.1f}s"
    print(f"# local services {verb}; env written to {args.state_dir / services.ENV_FILE}", file=sys.stderr)
    for line in services.env_lines(result):
        print(line)
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = services.down(args.state_dir)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    report = services.status(args.state_dir)
    if not report:
        print(f"no local services recorded in {args.state_dir}")
        return 1
    for name, info in report.items():
        if info["running"]:
            print(f"{name}: running pid={info['pid']} {info['address']}")
        else:
            print(f"{name}: stopped (last address {info['address']})")
        nodes = info.get("nodes", [])
        for node in nodes if len(nodes) > 1 else []:  # a cluster: a line per node
            state = f"running pid={node['pid']}" if node["running"] else "stopped"
            print(f"  node {node['node_id']}: {state} {node['address']}")
    return 0 if all(info["running"] for info in report.values()) else 1
