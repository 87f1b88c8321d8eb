"""GPU engine steps side by side: eager sdpa, triton eager, triton + CUDA graphs, at the shapes of
issue 24 (0.6B and 4B shapes, random weights, bf16), with a time limit per row and for the whole run.

For each row: tokens/s, ms a step (wall), GPU ms (CUDA events around the step: the device's span of
it), GPU busy ms (kernel time, torch.profiler over a few steps), host ms (the step thread's CPU time),
graph hit rate, capture time and memory, and the fraction of the HBM roofline: the bytes a step must
read (weights, plus the KV of every conversation, plus the KV it writes) over its wall time, over the
card's bandwidth (named from torch.cuda.get_device_name; unknown cards get no fraction). Not a test:
nothing here asserts a speed. Variants run one after another on the same machine and token streams.

    python bench/gpu_steps.py --out steps.json              # on a CUDA machine
    python bench/gpu_steps.py --device cpu --quick          # the script's plumbing on a CPU (sdpa only)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine as bench

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from processor.model.loader import GuardModel

# HBM bandwidth of the cards this runs on, bytes a second, by a substring of the device name.
CARD_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}
# variant -> (attention backend, CUDA graphs)
VARIANTS = {
    "sdpa eager": ("sdpa", False),
    "triton eager": ("triton", False),
    "triton + graphs": ("triton", True),
}
BLOCK = 16


@dataclass(frozen=True)
class Group:
    """Rows sharing one primed set of conversations: `counts` of them in turn, each bringing
    `tokens` (a fixed count, or (low, high) drawn per conversation per step) a step."""

    size: str
    context: int
    counts: tuple[int, ...]
    tokens: tuple[int, int]


GROUPS = [
    Group("0.6b-shape", 64, (64, 256, 1024), (1, 1)),
    Group("0.6b-shape", 512, (64, 256, 1024), (1, 1)),
    Group("0.6b-shape", 256, (200,), (1, 9)),
    Group("0.6b-shape", 1024, (200,), (1, 9)),
    Group("4b-shape", 64, (256,), (1, 1)),
]
QUICK_GROUPS = [Group("tiny", 32, (4, 16), (1, 1)), Group("tiny", 64, (8,), (1, 9))]


@dataclass
class Row:
    size: str
    variant: str
    conversations: int
    context: int
    tokens_a_step: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    gpu_span_ms: float = 0.0
    gpu_busy_ms: float | None = None
    host_ms: float = 0.0
    graph_hit_rate: float | None = None
    capture_seconds: float | None = None
    capture_mib: float | None = None
    bytes_per_step: float = 0.0
    roofline_fraction: float | None = None
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else 0.0


def card_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in CARD_BANDWIDTH.items():
        if key in name:
            return name, bandwidth
    return name, None


def weight_bytes(model: GuardModel) -> int:
    """Bytes of the weights a step reads: all of them, less the embedding table (a step reads its
    tokens' rows only, counted per step)."""
    total = sum(p.numel() * p.element_size() for p in model.network.parameters())
    embedding = model.network.model.embed_tokens.weight
    return total - embedding.numel() * embedding.element_size()


def build_engine(
    model: GuardModel, variant: str, tokens: int, conversations: int, max_step_tokens: int
) -> GuardEngine:
    backend, graphs = VARIANTS[variant]
    _, cache_dtype = resolve_attention_and_cache(backend, "auto", model.device, model.dtype)
    budget = (tokens // BLOCK + 2 * conversations + 4) * BLOCK * bytes_per_token(model.config, cache_dtype)
    config = EngineConfig(
        block_size=BLOCK,
        kv_cache_bytes=budget,
        max_batch_tokens=8192,
        max_batch_conversations=conversations,
        attention_backend=backend,
        cuda_graphs=graphs,
        cuda_graph_max_conversations=conversations,
        cuda_graph_max_tokens=max(conversations, max_step_tokens),
    )
    return GuardEngine(model, config)


def synchronize(model: GuardModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def gpu_busy_ms(engine: GuardEngine, feed, steps: int) -> float | None:
    """Kernel time a step, summed by torch.profiler over `steps` steps (None where it records none)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(steps):
                feed()
                engine.step()
            torch.cuda.synchronize()
        kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        micros = sum(getattr(e, "self_device_time_total", 0) or e.self_cuda_time_total for e in kernels)
    except Exception as error:  # a profiler that cannot start on this machine: the column stays empty
        print(f"  (profiler: {type(error).__name__}: {error})")
        return None
    return micros / 1000 / steps if micros else None


def run_row(
    engine: GuardEngine,
    model: GuardModel,
    row: Row,
    streams: dict[str, list[int]],
    group: Group,
    rng: random.Random,
    args: argparse.Namespace,
    bandwidth: float | None,
) -> None:
    names = list(streams)[: row.conversations]
    step_tokens: list[int] = []

    def feed() -> None:
        count = 0
        for name in names:
            length = rng.randint(*group.tokens)
            engine.submit(name, bench.random_tokens(rng, length))
            count += length
        step_tokens.append(count)

    for _ in range(2):  # warm-up: kernel compiles and first-use allocations
        feed()
        engine.step()
    synchronize(model)
    before = engine.stats()
    graph_before, eager_before = before.graph_steps, before.eager_steps
    per_token = bytes_per_token(model.config, engine.runner.kv_cache.dtype)
    keys_before = sum(engine.next_position(name) or 0 for name in names)
    weights, hidden_bytes = weight_bytes(model), model.config.hidden_size * model.dtype.itemsize
    is_cuda = model.device.type == "cuda"
    events = []
    step_tokens.clear()
    started = time.perf_counter()
    host = 0.0
    bytes_total = 0.0
    while row.steps < args.max_steps and time.perf_counter() - started < args.row_seconds:
        feed()
        keys = keys_before + step_tokens[-1]
        bytes_total += weights + step_tokens[-1] * hidden_bytes + keys * per_token
        keys_before = keys
        if is_cuda:
            start_event, end_event = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start_event.record()
        step_started, cpu_started = time.perf_counter(), time.thread_time()
        engine.step()
        row.seconds += time.perf_counter() - step_started
        host += time.thread_time() - cpu_started
        if is_cuda:
            end_event.record()
            events.append((start_event, end_event))
        row.steps += 1
        if engine.has_pending():
            row.note = "a step did not hold all conversations"
    synchronize(model)
    row.tokens = sum(step_tokens)
    row.host_ms = 1000 * host / max(row.steps, 1)
    if events:
        row.gpu_span_ms = sum(start.elapsed_time(end) for start, end in events) / len(events)
    stats = engine.stats()
    graphs, eager = stats.graph_steps - graph_before, stats.eager_steps - eager_before
    if engine.runner.graphs is not None:
        row.graph_hit_rate = graphs / max(graphs + eager, 1)
        row.capture_seconds = stats.graph_capture_seconds
        row.capture_mib = stats.graph_capture_bytes / 2**20
    row.bytes_per_step = bytes_total / max(row.steps, 1)
    if bandwidth and row.seconds:
        row.roofline_fraction = bytes_total / row.seconds / bandwidth
    if is_cuda and args.profile_steps:
        row.gpu_busy_ms = gpu_busy_ms(engine, feed, args.profile_steps)


def group_horizon(group: Group, args: argparse.Namespace) -> int:
    """Tokens a conversation of the group may take beyond its context: every row's steps."""
    return (args.max_steps + 2 + args.profile_steps) * group.tokens[1] * len(group.counts)


def tokens_label(group: Group) -> str:
    low, high = group.tokens
    return f"{low}" if low == high else f"{low}-{high}"


def run_size(
    model: GuardModel, groups: list[Group], variants: list[str], args: argparse.Namespace, deadline: float
) -> list[Row]:
    """Every group of one model shape, variant after variant: one engine a variant (one capture), its
    cache sized for the largest group, released between groups."""
    conversations = max(max(group.counts) for group in groups)
    tokens = max(max(g.counts) * (g.context + group_horizon(g, args) + BLOCK) for g in groups)
    step_tokens = max(max(g.counts) * g.tokens[1] for g in groups)
    _, bandwidth = card_bandwidth(model.device)
    rows: list[Row] = []
    for variant in variants:
        try:
            engine = build_engine(model, variant, tokens, conversations, step_tokens)
        except Exception as error:  # one failing variant must not cost the rest of the table
            note = f"{type(error).__name__}: {error}"
            rows.append(Row(groups[0].size, variant, conversations, 0, "-", note=f"engine: {note}"))
            print(f"  {groups[0].size} {variant}: engine: {note}", flush=True)
            continue
        for group in groups:
            rows += run_group(engine, model, group, variant, args, deadline, bandwidth)
        del engine
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_group(
    engine: GuardEngine,
    model: GuardModel,
    group: Group,
    variant: str,
    args: argparse.Namespace,
    deadline: float,
    bandwidth: float | None,
) -> list[Row]:
    """The group's rows on `engine`: its conversations primed to the group's context, then each row's
    first `count` of them stepping."""
    rows = [Row(group.size, variant, count, group.context, tokens_label(group)) for count in group.counts]
    if time.perf_counter() > deadline:
        for row in rows:
            row.note = "skipped: out of time"
        return rows
    try:
        engine.release_all()
        rng = random.Random(group.context)
        streams = {f"c{i}": bench.random_tokens(rng, group.context) for i in range(max(group.counts))}
        for name, stream in streams.items():
            engine.submit(name, stream)
        engine.run_until_idle()
        for row in rows:
            if time.perf_counter() > deadline:
                row.note = "skipped: out of time"
                continue
            run_row(engine, model, row, streams, group, random.Random(row.conversations), args, bandwidth)
            print(format_row(row), flush=True)
    except Exception as error:  # one failing group must not cost the rest of the table
        note = f"{type(error).__name__}: {error}"
        for row in rows:
            if not row.steps and not row.note:
                row.note = note
        print(f"  {group.size} {variant} context {group.context}: {note}", flush=True)
    return rows


HEADER = (
    f"{'size':10} {'variant':16} {'convs':>5} {'ctx':>5} {'tok/step':>8} {'tokens/s':>10} {'ms/step':>8} "
    f"{'GPU ms':>7} {'busy ms':>7} {'host ms':>7} {'graphs':>6} {'capture':>12} {'roofline':>8}"
)


def format_row(row: Row) -> str:
    def optional(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    capture = "-" if row.capture_seconds is None else f"{row.capture_seconds:.1f}s/{row.capture_mib:.0f}M"
    text = (
        f"{row.size:10} {row.variant:16} {row.conversations:>5} {row.context:>5} {row.tokens_a_step:>8} "
        f"{row.tokens_per_second:>10,.0f} {row.ms_per_step:>8.2f} {row.gpu_span_ms:>7.2f} "
        f"{optional(row.gpu_busy_ms, '.2f'):>7} {row.host_ms:>7.2f} {optional(row.graph_hit_rate, '.0%'):>6} "
        f"{capture:>12} {optional(row.roofline_fraction, '.1%'):>8}"
    )
    return text + (f"  {row.note}" if row.note else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few steps: the plumbing only")
    parser.add_argument("--variants", default=None, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--max-steps", type=int, default=12, help="timed steps a row, at most")
    parser.add_argument("--row-seconds", type=float, default=2.0, help="timed seconds a row, at most")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler a row (CUDA)")
    parser.add_argument(
        "--deadline", type=float, default=300.0, help="seconds for the whole run; rows past it skip"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    default_variants = list(VARIANTS) if device.type == "cuda" else ["sdpa eager"]
    variants = args.variants.split(",") if args.variants else default_variants
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    groups = QUICK_GROUPS if args.quick else GROUPS
    card, bandwidth = card_bandwidth(device)
    print(f"device: {card}; HBM bandwidth used for the roofline: {bandwidth and bandwidth / 1e12} TB/s")
    print(HEADER)
    rows: list[Row] = []
    for size in dict.fromkeys(group.size for group in groups):  # one model shape on the device at a time
        torch.manual_seed(0)
        model = bench.in_memory_model(size, args.device, dtype)
        size_groups = [group for group in groups if group.size == size]
        rows += run_size(model, size_groups, variants, args, started + args.deadline)
        del model
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    if args.out:
        result = {
            "device": card,
            "bandwidth_bytes_per_second": bandwidth,
            "dtype": str(dtype),
            "torch": torch.__version__,
            "rows": [
                asdict(row) | {"tokens_per_second": row.tokens_per_second, "ms_per_step": row.ms_per_step}
                for row in rows
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
