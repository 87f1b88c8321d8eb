"""Where a CUDA engine step's time goes: host phases timed around a synchronize, then torch.profiler's
top operations, at a few batch sizes (0.6B shape, random weights). Not a benchmark: a diagnosis aid.

    python bench/gpu_profile.py [--size 0.6b-shape] [--conversations 1,256] [--backend sdpa]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine as bench


def phase_times(engine, streams: dict[str, list[int]], position: int, steps: int) -> dict[str, float]:
    """Mean ms per step of: submit, schedule, runner (tensors + forward + labels to host), the rest."""
    totals = dict.fromkeys(("submit", "schedule", "runner", "step_total"), 0.0)
    scheduler_schedule, runner_run = engine.scheduler.schedule, engine.runner.run

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            totals[name] += time.perf_counter() - started
            return result

        return wrapper

    engine.scheduler.schedule, engine.runner.run = (
        timed("schedule", scheduler_schedule),
        timed("runner", runner_run),
    )
    for step in range(steps):
        started = time.perf_counter()
        for conversation_id, stream in streams.items():
            engine.submit(conversation_id, [stream[position + step]])
        totals["submit"] += time.perf_counter() - started
        started = time.perf_counter()
        engine.run_until_idle()
        torch.cuda.synchronize()
        totals["step_total"] += time.perf_counter() - started
    engine.scheduler.schedule, engine.runner.run = scheduler_schedule, runner_run
    return {name: 1000 * value / steps for name, value in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="0.6b-shape")
    parser.add_argument("--conversations", default="1,256")
    parser.add_argument("--backend", default="sdpa")
    args = parser.parse_args()
    bench.BACKEND = args.backend
    model = bench.in_memory_model(args.size, "cuda", torch.bfloat16)
    rng = random.Random(0)
    for count in (int(value) for value in args.conversations.split(",")):
        engine = bench.make_engine(model, count, 64 + 64)
        streams = {f"c{index}": bench.random_tokens(rng, 128) for index in range(count)}
        for conversation_id, stream in streams.items():
            engine.submit(conversation_id, stream[:64])
        engine.run_until_idle()
        phase_times(engine, streams, 64, 4)  # warm-up
        phases = phase_times(engine, streams, 68, 16)
        print(f"\n== {count} conversations, backend {args.backend}: ms per step", end=" ")
        print(", ".join(f"{name} {value:.2f}" for name, value in phases.items()))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            phase_times(engine, streams, 84, 2)
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
        )
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50)
        )
        engine.release_all()
        del engine
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
