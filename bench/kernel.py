"""CPU attention kernel benchmark: one layer's kernel call at a worker step's shapes, alone.

The kernel (processor/model/kernels/paged_attention.c) as the engine calls it, on a synthetic paged
cache: N conversations at a context of K keys, each bringing 1, 2 or 4 new tokens (a streaming step),
blocks interleaved as the engine allocates them while conversations grow. `--query-scales` widens the
scores (queries multiplied: 30 spreads a row's scores over hundreds, as sharp attention heads of real
checkpoints do; random test weights never do). `--baseline REV` builds that git revision's kernel
beside the working tree's and alternates the two in the same run, so that a change to the kernel is
compared on the same data, in the same minutes. Prints a table and writes JSON
(bench/results/kernel-cpu.json). Not a test: nothing here asserts a speed.

    python bench/kernel.py                          # the working tree's kernel
    python bench/kernel.py --baseline HEAD          # ... against the last commit's
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from pipeline import ROOT, rows_result, write_result  # sys.path: the repository root, for `processor`

from processor.model import cpu_kernel

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def kernel_at(revision: str | None, cache_dir: Path) -> cpu_kernel.PagedAttentionKernel:
    """The kernel built from `revision`'s source (None: the working tree's)."""
    source = cpu_kernel.SOURCE
    if revision is not None:
        relative = source.relative_to(ROOT).as_posix()
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{relative}"], capture_output=True, check=True
        ).stdout
        source = cache_dir / f"paged_attention-{revision.replace('/', '_')}.c"
        source.write_bytes(text)
    return cpu_kernel.PagedAttentionKernel(ctypes.CDLL(str(cpu_kernel.build(cache_dir, source=source))))


class Layer:
    """One layer's paged cache and a step's tensors: `conversations` x `length` new tokens at `context`."""

    def __init__(self, args, length: int, cache_dtype: torch.dtype, query_scale: float) -> None:
        generator = torch.Generator().manual_seed(length)
        heads, kv_heads, head_dim, block_size = args.heads, args.kv_heads, args.head_dim, args.block_size
        count, context = args.conversations, args.context
        blocks_each = (context + length + block_size - 1) // block_size
        cache = torch.randn(2, kv_heads, count * blocks_each * block_size, head_dim, generator=generator)
        self.cache = cache.to(cache_dtype)
        # Conversation i's block b is block b * count + i: every step's new blocks come one per
        # conversation from the free list, so a long conversation's blocks lie far apart.
        tables = [b * count + i for i in range(count) for b in range(blocks_each)]
        rows, slots = [], []
        for i in range(count):
            rows.append((i * length, context, length, i * blocks_each))
            table = tables[i * blocks_each : (i + 1) * blocks_each]
            positions = range(context, context + length)
            slots += [table[p // block_size] * block_size + p % block_size for p in positions]
        tokens = count * length
        self.query = torch.randn(tokens, heads, head_dim, generator=generator) * query_scale
        self.key = torch.randn(tokens, kv_heads, head_dim, generator=generator)
        self.value = torch.randn(tokens, kv_heads, head_dim, generator=generator)
        self.slots = torch.tensor(slots, dtype=torch.long)
        self.chunks = torch.tensor(rows, dtype=torch.long)
        self.tables = torch.tensor(tables, dtype=torch.long)
        self.block_size, self.scale = block_size, head_dim**-0.5
        self.scratch_floats = (heads, kv_heads, head_dim, block_size, length, context + length)

    def attend(self, kernel: cpu_kernel.PagedAttentionKernel, scratch: torch.Tensor) -> torch.Tensor:
        return kernel.attend(
            self.query,
            self.key,
            self.value,
            self.cache,
            self.slots,
            self.chunks,
            self.tables,
            self.block_size,
            self.scale,
            [(0, self.chunks.shape[0])],
            lambda part: scratch,
        )


def measure(args, kernels: dict[str, cpu_kernel.PagedAttentionKernel]) -> list[dict]:
    rows = []
    for cache_name in args.cache_dtypes:
        for query_scale in args.query_scales:
            for length in args.lengths:
                layer = Layer(args, length, CACHE_DTYPES[cache_name], query_scale)
                scratch = torch.empty(next(iter(kernels.values())).scratch_floats(*layer.scratch_floats))
                outputs = {name: layer.attend(kernel, scratch) for name, kernel in kernels.items()}
                reference = next(iter(outputs.values()))
                seconds: dict[str, list[float]] = {name: [] for name in kernels}
                for _ in range(args.rounds):  # the variants alternate: the machine's speed drifts
                    for name, kernel in kernels.items():
                        started = time.perf_counter()
                        for _ in range(args.calls):
                            layer.attend(kernel, scratch)
                        seconds[name].append((time.perf_counter() - started) / args.calls)
                for name in kernels:
                    rows.append(
                        {
                            "kernel": name,
                            "cache_dtype": cache_name,
                            "query_scale": query_scale,
                            "new_tokens": length,
                            "ms_per_call_median": round(1000 * statistics.median(seconds[name]), 3),
                            "ms_per_call_best": round(1000 * min(seconds[name]), 3),
                            "max_difference_from_first": (outputs[name] - reference).abs().max().item(),
                        }
                    )
    return rows


def print_table(args, rows: list[dict]) -> None:
    print(
        f"\nkernel, one layer, one thread: {args.conversations} conversations at {args.context} keys, "
        f"{args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, blocks of {args.block_size}"
    )
    print(f"{'kernel':>14} {'cache':>8} {'q scale':>8} {'new tokens':>11} {'ms median':>10} {'ms best':>8}")
    for row in rows:
        print(
            f"{row['kernel']:>14} {row['cache_dtype']:>8} {row['query_scale']:>8g} {row['new_tokens']:>11} "
            f"{row['ms_per_call_median']:>10.3f} {row['ms_per_call_best']:>8.3f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default=None, help="a git revision whose kernel runs beside this one")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--context", type=int, default=450, help="keys each conversation holds")
    parser.add_argument("--lengths", default="1,2,4", help="new tokens per conversation, comma separated")
    parser.add_argument("--cache-dtypes", default="float32,float16")
    parser.add_argument("--query-scales", default="1,30", help="queries multiplied by these (score spread)")
    parser.add_argument("--heads", type=int, default=4, help="the tiny test model's shape by default")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=10, help="kernel calls timed together per round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernel-cpu.json")
    args = parser.parse_args()
    args.lengths = [int(value) for value in args.lengths.split(",")]
    args.cache_dtypes = args.cache_dtypes.split(",")
    args.query_scales = [float(value) for value in args.query_scales.split(",")]
    torch.set_num_threads(1)  # the worker's CPU default
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        kernels = {"working tree": kernel_at(None, Path(scratch))}
        if args.baseline:
            kernels[args.baseline] = kernel_at(args.baseline, Path(scratch))
        rows = measure(args, kernels)
    print_table(args, rows)
    write_result(args.out, rows_result(args, started, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
