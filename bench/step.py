"""Worker step benchmark: the worker's preparation of one step (decode, plan, engine, verdicts).

What a step costs the worker's main thread with nothing else in the way: records are made ahead and
run through the real `Worker.prepare` and the real engine; no Kafka, no Redis. The pipeline
benchmark's figures move with everything that shares the machine; this one isolates the worker's
own CPU per step, at a few step shapes (events per conversation per step, one token each; the gap
between 1 and 10 events a conversation is a step's fixed, per-conversation part) and for each KV
cache dtype asked for. Prints a table and writes JSON (bench/results/step-<device>.json). Not a
test: nothing here asserts a speed.

Each code tree's worker runs in a process of its own (bench/step_server.py). With `--baseline REV`
that revision's `processor` is unpacked beside this checkout and the two workers prepare their steps
in turn, step by step, on the same records: a change is judged by the median of the per-step ratios,
which the machine's minute-to-minute speed moves far less than it moves either side's time.

    python bench/step.py --model DIR                     # a checkpoint (guardstream make-test-model DIR)
    python bench/step.py --model DIR --baseline HEAD     # this checkout against the last commit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline import ROOT, rows_result, write_result
from trees import TreeServer, step_in_turn, unpack_revision

SERVER = Path(__file__).with_name("step_server.py")


def step_server(
    args: argparse.Namespace, root: Path, kv_cache_dtype: str, events: int, seed: int
) -> TreeServer:
    """One code tree's worker in its own process (bench/step_server.py), preparing a step per call."""
    command = [sys.executable, str(SERVER), "--root", str(root), "--model", str(args.model)]
    command += ["--device", args.device, "--threads", str(args.threads)]
    command += ["--conversations", str(args.conversations), "--context", str(args.context)]
    command += ["--events", str(events), "--kv-cache-dtype", kv_cache_dtype, "--seed", str(seed)]
    command += ["--attention-backend", args.attention_backend, "--template", args.template]
    command += ["--steps", str(args.steps)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    return TreeServer(command, root)


def measure(args, trees: dict[str, Path], kv_cache_dtype: str, events: int, seed: int) -> list[dict]:
    """Every tree's worker, set up at once, then stepping in turn (the order flipping every step)."""
    servers = {name: step_server(args, root, kv_cache_dtype, events, seed) for name, root in trees.items()}
    answers = step_in_turn(servers, args.steps)
    seconds = {name: [answer["seconds"] for answer in tree_answers] for name, tree_answers in answers.items()}
    names = list(servers)
    first = names[0]
    rows = []
    for name in names:
        median = statistics.median(seconds[name])
        row = {
            "tree": name,
            "kv_cache_dtype": kv_cache_dtype,
            "events_per_conversation": events,
            "conversations": args.conversations,
            "events_per_step": args.conversations * events,
            "context_first": args.context,
            "ms_per_step_median": round(1000 * median, 2),
            "us_per_event_median": round(1e6 * median / (args.conversations * events), 2),
        }
        if name != first:  # step by step against the first tree's step of the same records
            ratios = sorted(mine / theirs for mine, theirs in zip(seconds[name], seconds[first], strict=True))
            quarter = len(ratios) // 4
            row["ratio_to_working_tree_median"] = round(statistics.median(ratios), 3)
            row["ratio_to_working_tree_iqr"] = [round(ratios[quarter], 3), round(ratios[-1 - quarter], 3)]
        rows.append(row)
    return rows


def run(args, trees: dict[str, Path]) -> list[dict]:
    rows: list[dict] = []
    for round_index in range(args.rounds):
        for kv_cache_dtype in args.kv_cache_dtypes:
            for events in args.events_per_conversation:
                for row in measure(args, trees, kv_cache_dtype, events, seed=round_index):
                    row["round"] = round_index + 1
                    rows.append(row)
                    ratio = row.get("ratio_to_working_tree_median")
                    print(
                        f"  round {row['round']}, {row['tree']}, {kv_cache_dtype} KV, {events} events a "
                        f"conversation: {row['ms_per_step_median']} ms a step, {row['us_per_event_median']} "
                        f"us an event" + ("" if ratio is None else f", {ratio}x the working tree's"),
                        flush=True,
                    )
    return rows


def print_table(args, rows: list[dict]) -> None:
    print(
        f"\nworker step: {args.conversations} conversations, one token an event, from {args.context} keys, "
        f"{args.steps} steps (median CPU per step; ratio: median of per-step ratios, all rounds)"
    )
    print(
        f"{'tree':>14} {'KV cache':>9} {'events/conv':>12} {'events/step':>12} {'ms/step':>9} "
        f"{'us/event':>9}  its time / the working tree's"
    )
    shapes: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        shapes.setdefault((row["tree"], row["kv_cache_dtype"], row["events_per_conversation"]), []).append(
            row
        )
    for (tree, kv_cache_dtype, events), runs in shapes.items():
        best = min(runs, key=lambda row: row["ms_per_step_median"])
        ratios = [
            row["ratio_to_working_tree_median"] for row in runs if "ratio_to_working_tree_median" in row
        ]
        ratio = (
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f} by round)"
            if ratios
            else ""
        )
        print(
            f"{tree:>14} {kv_cache_dtype:>9} {events:>12} {best['events_per_step']:>12} "
            f"{best['ms_per_step_median']:>9.1f} {best['us_per_event_median']:>9.1f}  {ratio}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument(
        "--baseline", default=None, help="a git revision whose worker steps in turn with this one"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the worker's CPU default here)"
    )
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--context", type=int, default=400, help="tokens each conversation holds at the start"
    )
    parser.add_argument(
        "--events-per-conversation",
        default="1,4,10",
        help="step shapes: events (one token each) per conversation per step, comma separated",
    )
    parser.add_argument("--kv-cache-dtypes", default="auto", help="comma separated: auto, float16, ...")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--template", default="chat", choices=["chat", "raw"])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per shape")
    parser.add_argument(
        "--rounds", type=int, default=2, help="every shape once a round, each with fresh workers"
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/step-<device>.json")
    args = parser.parse_args()
    args.events_per_conversation = [int(value) for value in args.events_per_conversation.split(",")]
    args.kv_cache_dtypes = args.kv_cache_dtypes.split(",")
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"working tree": ROOT}
        if args.baseline:
            trees[args.baseline] = unpack_revision(args.baseline, Path(scratch))
        rows = run(args, trees)
    print_table(args, rows)
    write_result(
        args.out or ROOT / "bench" / "results" / f"step-{args.device.split(':')[0]}.json",
        rows_result(args, started, rows),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
