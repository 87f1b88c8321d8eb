"""Soak: a steady offered load for N minutes through two worker processes, one of them SIGKILLed and
restarted every `--kill-every` seconds. Not part of CI.

    .venv/bin/python bench/soak.py                          # 10 minutes, a kill every 2 minutes
    .venv/bin/python bench/soak.py --minutes 3 --kill-every 60

Conversations stream one token per event (a short user turn, then assistant tokens); each ends after
`--conversation-tokens` and a new one takes its place. At the end every token event must have its
verdict with the labels `score_ids` gives on the whole conversation. Reports events in, token verdicts
out, lost (must be 0), duplicated verdicts, recovery time per kill (until every conversation that was
streaming has a new verdict), and the never-killed worker's RSS at start and end. Prints a table and
writes bench/results/soak.json.

Without --kafka-bootstrap / --redis-url it starts local services (processor.local) and stops them after;
without --model it writes the tiny random test model to a temporary folder (CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from processor.model import load_guard_model  # noqa: E402
from tests.reliability.load import (  # noqa: E402
    SteadyLoad,
    VerdictRecorder,
    check_delivery,
    events_on_topic,
    recovery_seconds,
)
from tests.reliability.workers import WorkerConfig, WorkerPool, wait_balanced  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"


async def soak(args: argparse.Namespace, bootstrap: str, redis_url: str, model_dir: Path, logs: Path) -> dict:
    prefix = f"soak.{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(
        bootstrap,
        redis_url,
        model_dir,
        prefix,
        f"{prefix}:",
        partitions=args.partitions,
        kv_cache_bytes=args.kv_cache_bytes,
    )
    with WorkerPool(config, logs) as pool:
        steady, victim = pool.start("steady", "victim-0")
        await wait_balanced([steady, victim], args.partitions)
        rss_start = steady.rss_bytes()
        load = SteadyLoad(
            bootstrap,
            config.tokens_topic,
            args.conversations,
            args.rate,
            max_assistant_tokens=args.conversation_tokens,
            prefix="soak",
            rotate=True,
        )
        kills: list[dict] = []
        async with VerdictRecorder(bootstrap, config.verdicts_topic) as recorder:
            streaming = asyncio.create_task(load.run())
            started = time.monotonic()
            deadline = started + args.minutes * 60
            next_kill = started + args.kill_every
            while time.monotonic() < deadline:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                if streaming.done():
                    streaming.result()  # the producer failed: say why
                if time.monotonic() >= next_kill and time.monotonic() < deadline - 20:
                    killed_at, at_s = time.time(), round(time.monotonic() - started, 1)
                    victim.kill()
                    (victim,) = pool.start(f"victim-{len(kills) + 1}")
                    await victim.wait_assigned()
                    rejoined_s = round(time.time() - killed_at, 2)
                    kills.append({"at_s": at_s, "killed_at": killed_at, "rejoined_s": rejoined_s})
                    print(
                        f"kill {len(kills)}: restarted worker owns {victim.assigned()} "
                        f"after {kills[-1]['rejoined_s']} s",
                        flush=True,
                    )
                    next_kill += args.kill_every
            rss_end = steady.rss_bytes()
            load.stop()
            await asyncio.wait_for(streaming, timeout=60)
            ids = {conversation.conversation_id for conversation in load.conversations}
            with contextlib.suppress(TimeoutError):
                await recorder.wait_ended(ids, timeout=120)
            await asyncio.sleep(2)
            for kill in kills:
                kill["recovery_s"] = recovery_seconds(recorder, load, kill.pop("killed_at"))
            print("checking every verdict against score_ids ...", flush=True)
            model = load_guard_model(model_dir, device="cpu", dtype="float32")
            delivery = check_delivery(model, load.conversations, recorder.received)
            delivered = await events_on_topic(bootstrap, config.tokens_topic)
        return {
            "minutes": args.minutes,
            "kill_every_s": args.kill_every,
            "offered_events_per_s": args.conversations * args.rate,
            "conversations": len(load.conversations),
            "events_in": load.sent,
            "events_on_topic": delivered,
            "token_verdicts_out": delivery.token_verdicts,
            "lost": delivery.lost,
            "duplicated_verdicts": delivery.duplicates,
            "problems": len(delivery.problems),
            "first_problems": delivery.problems[:5],
            "kills": kills,
            "steady_worker_rss_mb": {"start": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1)},
            "device": "cpu",
            "model": "tiny random test model" if not args.model else args.model,
        }


def table(report: dict) -> str:
    rows = [
        ("duration", f"{report['minutes']} min, SIGKILL + restart every {report['kill_every_s']} s"),
        (
            "offered load",
            f"{report['offered_events_per_s']:.0f} token events/s, {report['conversations']} conversations",
        ),
        ("events in", str(report["events_in"])),
        ("token verdicts out", str(report["token_verdicts_out"])),
        ("lost", str(report["lost"])),
        ("duplicated verdicts", str(report["duplicated_verdicts"])),
        ("label mismatches / problems", str(report["problems"])),
        ("recovery per kill (s)", ", ".join(str(kill["recovery_s"]) for kill in report["kills"]) or "-"),
        (
            "restarted worker rejoined (s)",
            ", ".join(str(kill["rejoined_s"]) for kill in report["kills"]) or "-",
        ),
        (
            "steady worker RSS start -> end",
            f"{report['steady_worker_rss_mb']['start']} -> {report['steady_worker_rss_mb']['end']} MiB",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


async def main_async(args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        bootstrap, redis_url = args.kafka_bootstrap, args.redis_url
        if not bootstrap or not redis_url:
            from processor.local.testing import kafka_endpoint, redis_endpoint

            bootstrap = bootstrap or kafka_endpoint(stack, scratch / "services")
            redis_url = redis_url or redis_endpoint(stack, scratch / "services")
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from processor.model.testmodel import write_test_model

            model_dir = write_test_model(scratch / "tiny-model", size="tiny", seed=0)
        return await soak(args, bootstrap, redis_url, model_dir, scratch / "workers")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds between SIGKILLs")
    parser.add_argument("--conversations", type=int, default=16, help="streaming at once")
    parser.add_argument("--rate", type=float, default=4.0, help="token events/s per conversation")
    parser.add_argument(
        "--conversation-tokens", type=int, default=300, help="assistant tokens per conversation"
    )
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--kv-cache-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--model", help="checkpoint folder (default: the tiny random test model, on CPU)")
    parser.add_argument("--kafka-bootstrap")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0 if report["lost"] == 0 and report["problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
