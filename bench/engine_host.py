"""Engine host-side step benchmark: what one engine step costs the host beside the model's compute.

Every conversation brings one new token a step, from a context of `--context-min`..`--context-max`
tokens, on the tiny random checkpoint, so the forward is small and the host's bookkeeping shows. Each
step's time is split by timestamps taken around the engine's parts, none of them in product code:

    submit    GuardEngine.submit for every conversation (before the step)
    schedule  Scheduler.schedule
    metadata  ModelRunner.run up to the network's forward (token ids, positions, slots, tables)
    forward   the network's forward (a forward pre-hook and hook)
    labels    GuardLogits.label_matrix (softmax and argmax of the heads)
    extract   ModelRunner.run after the labels (the label matrix to host columns)
    results   the rest of GuardEngine.step (results per conversation, stats)
    host      submit + schedule + metadata + extract + results: the step less the model's compute

With `--attention-backend sdpa` the metadata includes building the attention masks: device work on a
GPU, host compute here.

Each code tree runs in a process of its own (`--serve`), which imports `processor` from its `--root`.
With `--baseline REV` that revision's `processor` is unpacked beside this checkout and the two trees
step in turn, step by step, the order flipping every step, over several rounds of fresh processes: a
change is judged by the median of the per-step ratios of host time. `--profile` runs each tree's
steps under cProfile instead and prints where the host time goes. Writes JSON. Not a test.

    python bench/engine_host.py --conversations 64,256,1024 --baseline HEAD --out bench/results/X.json
    python bench/engine_host.py --conversations 256 --profile [--baseline HEAD]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trees import ROOT, TreeServer, step_in_turn, unpack_revision

PHASES = ("submit", "schedule", "metadata", "forward", "labels", "extract", "results")
HOST_PHASES = ("submit", "schedule", "metadata", "extract", "results")
WARMUP_STEPS = 5
VOCAB_SAMPLE = 5000


# -- the server: one code tree's engine, stepping on command ------------------------------------------


class PhaseClock:
    """Timestamps around the engine's parts, patched onto one engine instance and the logits class."""

    def __init__(self, engine, qwen3_guard) -> None:
        self.marks: dict[str, float] = {}
        clock = time.perf_counter

        def around(name: str, function):
            def timed(*args, **kwargs):
                self.marks[name + "_start"] = clock()
                result = function(*args, **kwargs)
                self.marks[name + "_end"] = clock()
                return result

            return timed

        engine.scheduler.schedule = around("schedule", engine.scheduler.schedule)
        engine.runner.run = around("runner", engine.runner.run)
        logits_class = qwen3_guard.GuardLogits
        logits_class.label_matrix = around("labels", logits_class.label_matrix)
        network = engine.model.network
        network.register_forward_pre_hook(lambda *_: self.marks.__setitem__("forward_start", clock()))
        network.register_forward_hook(lambda *_: self.marks.__setitem__("forward_end", clock()))

    def phases(self, submit: float, step_start: float, step_end: float) -> dict[str, float]:
        m = self.marks
        schedule = m["schedule_end"] - m["schedule_start"]
        runner = m["runner_end"] - m["runner_start"]
        forward = m["forward_end"] - m["forward_start"]
        labels = m["labels_end"] - m["labels_start"]
        phases = {
            "submit": submit,
            "schedule": schedule,
            "metadata": m["forward_start"] - m["runner_start"],
            "forward": forward,
            "labels": labels,
            "extract": m["runner_end"] - m["labels_end"],
            "results": (step_end - step_start) - schedule - runner,
        }
        phases["host"] = sum(phases[name] for name in HOST_PHASES)
        return phases


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.root.resolve()))  # before anything imports `processor`
    import gc

    import torch

    import processor
    from processor.engine import EngineConfig, GuardEngine
    from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
    from processor.model import load_guard_model, qwen3_guard

    torch.set_num_threads(1)
    model = load_guard_model(str(args.model), "cpu", "float32")
    _, cache_dtype = resolve_attention_and_cache(args.attention_backend, "auto", model.device, model.dtype)
    tokens_each = args.context_max + args.steps + WARMUP_STEPS + 32
    config = EngineConfig(
        kv_cache_bytes=args.conversations * tokens_each * bytes_per_token(model.config, cache_dtype),
        attention_backend=args.attention_backend,
        max_batch_conversations=args.conversations,
    )
    engine = GuardEngine(model, config)
    rng = random.Random(args.seed)
    conversations = [f"host-bench-{number:05d}" for number in range(args.conversations)]
    for conversation_id in conversations:
        context = rng.randint(args.context_min, args.context_max)
        engine.submit(conversation_id, [rng.randrange(VOCAB_SAMPLE) for _ in range(context)])
    engine.run_until_idle()
    steps = [[[rng.randrange(VOCAB_SAMPLE)] for _ in conversations] for _ in range(WARMUP_STEPS + args.steps)]

    def one_step(new_tokens: list[list[int]]) -> tuple[float, float, float]:
        started = time.perf_counter()
        for conversation_id, token_ids in zip(conversations, new_tokens, strict=True):
            engine.submit(conversation_id, token_ids)
        step_start = time.perf_counter()
        results = engine.step()
        step_end = time.perf_counter()
        assert len(results) == len(conversations), "every conversation's token runs in one step"
        return step_start - started, step_start, step_end

    clock = PhaseClock(engine, qwen3_guard)
    for new_tokens in steps[:WARMUP_STEPS]:
        one_step(new_tokens)
    gc.collect()
    gc.freeze()  # as the worker does (processor.heap): the setup's objects are never scanned
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for new_tokens in steps[WARMUP_STEPS:]:
            one_step(new_tokens)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.profile_lines)
        stats.sort_stats("cumulative").print_stats(args.profile_lines)
        return
    answer({"ready": True, "processor": str(Path(processor.__file__).parent)})
    for new_tokens in steps[WARMUP_STEPS:]:
        if sys.stdin.readline().strip() != "step":
            break
        answer(clock.phases(*one_step(new_tokens)))


# -- the driver ---------------------------------------------------------------------------------------


def server(args: argparse.Namespace, root: Path, conversations: int, seed: int) -> TreeServer:
    """One code tree's engine in its own process (this script with --serve), timing a step per call."""
    command = [sys.executable, __file__, "--serve", "--root", str(root), "--model", str(args.model)]
    command += ["--conversations", str(conversations), "--steps", str(args.steps), "--seed", str(seed)]
    command += ["--context-min", str(args.context_min), "--context-max", str(args.context_max)]
    command += ["--attention-backend", args.attention_backend]
    return TreeServer(command, root)


def measure(args, trees: dict[str, Path], conversations: int, seed: int) -> dict[str, list[dict]]:
    """Every tree's engine set up, then stepping in turn (the order flipping every step)."""
    return step_in_turn(
        {name: server(args, root, conversations, seed) for name, root in trees.items()}, args.steps
    )


def summarize(tree: str, conversations: int, steps: list[dict]) -> dict:
    row: dict = {"tree": tree, "conversations": conversations, "steps": len(steps)}
    for name in (*PHASES, "host"):
        median = statistics.median(step[name] for step in steps)
        row[f"{name}_us_per_step"] = round(1e6 * median, 1)
        row[f"{name}_us_per_conversation"] = round(1e6 * median / conversations, 3)
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'tree':>14} {'convs':>6} " + " ".join(f"{name:>9}" for name in (*PHASES, "host"))
    print("\nmedian us per step (us per conversation below), forward and labels are the model's compute")
    print(header)
    for row in rows:
        cells = " ".join(f"{row[f'{name}_us_per_step']:>9.0f}" for name in (*PHASES, "host"))
        print(f"{row['tree']:>14} {row['conversations']:>6} {cells}")
        cells = " ".join(f"{row[f'{name}_us_per_conversation']:>9.2f}" for name in (*PHASES, "host"))
        print(f"{'':>14} {'':>6} {cells}")


def compare(per_step: dict, trees: list[str], conversations: list[int]) -> list[dict]:
    """Host time of each tree against the first, per conversation count: the median of per-step ratios
    (each step against the other tree's step of the same round and index), all rounds pooled."""
    comparisons = []
    first = trees[0]
    for count in conversations:
        for tree in trees[1:]:
            by_round = [
                [
                    theirs["host"] / mine["host"]
                    for mine, theirs in zip(round_steps[first], round_steps[tree], strict=True)
                ]
                for round_steps in per_step[count]
            ]
            ratios = sorted(ratio for round_ratios in by_round for ratio in round_ratios)
            quarter = len(ratios) // 4
            comparison = {
                "conversations": count,
                "tree": tree,
                "host_ratio_to_first_median": round(statistics.median(ratios), 3),
                "host_ratio_to_first_iqr": [round(ratios[quarter], 3), round(ratios[-1 - quarter], 3)],
                "host_ratio_to_first_by_round": [round(statistics.median(r), 3) for r in by_round],
            }
            comparisons.append(comparison)
            print(
                f"{count} conversations: {tree}'s host time / {first}'s = "
                f"{comparison['host_ratio_to_first_median']} (IQR {comparison['host_ratio_to_first_iqr']}, "
                f"by round {comparison['host_ratio_to_first_by_round']})"
            )
    return comparisons


def profile(args, trees: dict[str, Path], counts: list[int]) -> None:
    """Each tree's steps under cProfile, in a process of its own (the profile goes to stderr)."""
    for count in counts:
        for name, root in trees.items():
            print(f"\n== {name}, {count} conversations ==", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--serve", "--profile", "--root", str(root)]
            command += ["--model", str(args.model), "--conversations", str(count), "--steps", str(args.steps)]
            command += ["--context-min", str(args.context_min), "--context-max", str(args.context_max)]
            command += ["--attention-backend", args.attention_backend]
            command += ["--profile-lines", str(args.profile_lines)]
            subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: a fresh tiny one)")
    parser.add_argument("--baseline", default=None, help="a git revision that steps in turn with this tree")
    parser.add_argument("--conversations", default="256", help="comma separated")
    parser.add_argument("--context-min", type=int, default=64)
    parser.add_argument("--context-max", type=int, default=512)
    parser.add_argument("--attention-backend", default="auto", help="auto (the C kernel on CPU) or sdpa")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per conversation count")
    parser.add_argument("--profile", action="store_true", help="cProfile each tree's steps instead")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="JSON file")
    # The server's own arguments (bench/engine_host.py runs itself with --serve).
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the code tree measured first (default: this one)"
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        args.conversations = int(args.conversations)
        serve(args)
        return 0
    started = time.time()
    counts = [int(value) for value in args.conversations.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        if args.model is None:
            sys.path.insert(0, str(ROOT))
            from processor.model.testmodel import write_test_model

            args.model = write_test_model(Path(scratch) / "tiny", size="tiny")
        trees = {"working tree" if args.root == ROOT else str(args.root): args.root}
        if args.baseline:
            base = Path(scratch) / "baseline"
            base.mkdir()
            trees[args.baseline] = unpack_revision(args.baseline, base)
        if args.profile:
            profile(args, trees, counts)
            return 0
        rows, per_step = [], {}
        for count in counts:
            per_step[count] = []
            for round_index in range(args.rounds):
                steps = measure(args, trees, count, seed=round_index)
                per_step[count].append(steps)
                for tree, tree_steps in steps.items():
                    row = summarize(tree, count, tree_steps)
                    row["round"] = round_index + 1
                    rows.append(row)
                    print(
                        f"  round {round_index + 1}, {tree}, {count} conversations: "
                        f"host {row['host_us_per_step']:.0f} us a step",
                        flush=True,
                    )
        pooled = [
            summarize(tree, count, [step for round_steps in per_step[count] for step in round_steps[tree]])
            for count in counts
            for tree in trees
        ]
        print_table(pooled)
        comparisons = compare(per_step, list(trees), counts) if len(trees) > 1 else []
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "args": {
                key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
            },
            "pooled": pooled,
            "comparisons": comparisons,
            "rounds": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
