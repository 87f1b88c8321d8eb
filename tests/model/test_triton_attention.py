"""The Triton paged-attention backend, run by Triton's interpreter on CPU tensors, against SDPA.

TRITON_INTERPRET=1 must be set when the kernels are defined (triton.jit reads it then, at the first
import of processor.model.triton_attention): the `kernels` fixture sets it and imports the module
afresh, and the end-to-end `score` run sets it in a subprocess's environment.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn import functional as F

from processor.engine import EngineConfig, GuardEngine
from processor.model import load_guard_model
from processor.model.attention import PagedTables, paged_tables, resolve_attention_backend
from processor.score import score_ids, template_messages
from tests.engine.test_attention_backends import max_difference, run_mixed_batch
from tests.model.reference import HEAD_KEYS, ReferenceGuard

pytest.importorskip("triton")

KERNEL_MODULE = "processor.model.triton_attention"
REPO_ROOT = Path(__file__).resolve().parents[2]
PADDING = None  # a conversation slot of a bucketed step that holds no conversation


def forget_kernel_module() -> None:
    """Drop the kernel module, so that the next import defines its kernels again."""
    sys.modules.pop(KERNEL_MODULE, None)
    package = sys.modules["processor.model"]
    if hasattr(package, "triton_attention"):
        delattr(package, "triton_attention")


def interpret_triton_language(patch: pytest.MonkeyPatch) -> None:
    """Give triton.language's own Triton-written helpers (tl.max, tl.sum, tl.zeros, ...) interpreted
    twins. They were defined when triton was first imported (torch._dynamo imports it before any test
    runs), compiled, and the interpreter cannot call compiled helpers from an interpreted kernel."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict[int, InterpretedFunction] = {}  # one twin per helper, however many names it has
    for module in (tl, tl.core, tl.math, tl.standard):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                twin = twins.setdefault(id(value), InterpretedFunction(value.fn))
                patch.setattr(module, name, twin)


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    """The kernel module with its kernels interpreted; TRITON_INTERPRET stays set for the module's
    engines, which refuse the backend on a CPU without it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        if isinstance(tl.standard.max, JITFunction):  # triton was imported without the interpreter
            interpret_triton_language(patch)
        forget_kernel_module()
        module = importlib.import_module(KERNEL_MODULE)
        assert module.INTERPRETED
        yield module
    forget_kernel_module()  # whatever runs next defines them under its own environment


class PagedLayer:
    """One layer's cache with conversations in shuffled blocks (block 0 kept back, as the padding
    block), fed steps through the kernels; keeps each conversation's keys and values as stored."""

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        cache_dtype: torch.dtype = torch.float32,
        blocks: int = 96,
        seed: int = 0,
    ) -> None:
        self.block_size = block_size
        self.cache = torch.zeros(2, kv_heads, blocks * block_size, head_dim, dtype=cache_dtype)
        self.free = list(range(1, blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.keys: dict[str, torch.Tensor] = {}  # float32, as the cache holds them
        self.values: dict[str, torch.Tensor] = {}

    def slots(self, name: str, start: int, end: int) -> list[int]:
        table = self.tables.setdefault(name, [])
        while len(table) * self.block_size < end:
            table.append(self.free.pop())
        return [
            table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)
        ]

    def metadata(
        self, chunks: list[tuple[str | None, int]], padding_tokens: int = 0
    ) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """Slots, lengths, seq_lens and tables of a step: `chunks` (conversation or PADDING, new
        tokens) packed in order, then `padding_tokens` owned by no conversation. A PADDING entry with
        tokens reads the padding block; its tokens and the unowned ones have slot -1 (not written)."""
        slots, lengths, seq_lens, tables = [], [], [], []
        for name, length in chunks:
            if name is PADDING:
                slots += [-1] * length
                lengths.append(length)
                seq_lens.append(length)
                tables.append([0] * -(-length // self.block_size))
                continue
            start = self.keys[name].shape[0] if name in self.keys else 0
            slots += self.slots(name, start, start + length)
            lengths.append(length)
            seq_lens.append(start + length)
            tables.append(self.tables[name])
        return slots + [-1] * padding_tokens, lengths, seq_lens, tables

    def step(
        self,
        kernels: ModuleType,
        chunks: list[tuple[str | None, int]],
        generator: torch.Generator,
        heads: int,
        padding_tokens: int = 0,
        dtype: torch.dtype = torch.float32,
        tables: PagedTables | None = None,
        **tiles,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step of random queries, keys and values; returns (output, query)."""
        slots, lengths, seq_lens, block_tables = self.metadata(chunks, padding_tokens)
        tokens = len(slots)
        kv_heads, head_dim = self.cache.shape[1], self.cache.shape[3]
        query = torch.randn(tokens, heads, head_dim, generator=generator).to(dtype)
        key = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype)
        value = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype)
        if tables is None:
            tables = paged_tables(lengths, seq_lens, block_tables, self.cache.device)
        before = self.cache.clone()
        kernels.store_kv(key, value, self.cache, torch.tensor(slots, dtype=torch.long))
        changed = (self.cache != before).permute(2, 0, 1, 3)  # [slots, 2, kv_heads, head_dim]
        written = changed.reshape(changed.shape[0], -1).any(-1)
        assert set(written.nonzero().flatten().tolist()) == {slot for slot in slots if slot >= 0}
        out = kernels.paged_attention(query, self.cache, tables, self.block_size, head_dim**-0.5, **tiles)
        row = 0
        for name, length in chunks:
            if name is not PADDING:
                stored = self.cache.dtype
                new_keys = key[row : row + length].to(stored).float()
                new_values = value[row : row + length].to(stored).float()
                self.keys[name] = torch.cat([self.keys.get(name, new_keys[:0]), new_keys])
                self.values[name] = torch.cat([self.values.get(name, new_values[:0]), new_values])
            row += length
        return out, query

    def expected(self, name: str, query: torch.Tensor) -> torch.Tensor:
        """SDPA over the conversation's whole history, causal by position; query [Q, heads, D] is its
        newest Q tokens."""
        length, heads, head_dim = query.shape
        keys, values = self.keys[name], self.values[name]
        group = heads // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        positions = torch.arange(keys.shape[1] - length, keys.shape[1])
        allowed = torch.arange(keys.shape[1])[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(
            query.float().transpose(0, 1), keys, values, attn_mask=allowed, scale=head_dim**-0.5
        )
        return attended.transpose(0, 1)


def assert_matches_sdpa(
    layer: PagedLayer,
    chunks: list[tuple[str | None, int]],
    out: torch.Tensor,
    query: torch.Tensor,
    tolerance: float = 1e-5,
) -> None:
    row = 0
    for name, length in chunks:
        actual = out[row : row + length].float()
        if name is PADDING:
            assert torch.isfinite(actual).all()  # it read the padding block: zeros, not garbage
        else:
            difference = (actual - layer.expected(name, query[row : row + length])).abs().max().item()
            assert difference < tolerance, f"{name} ({length} new tokens): {difference}"
        row += length


CACHE_DTYPES = [torch.float32, torch.float16]
# (query heads, KV heads): GQA groups of 2 and 4
HEAD_SHAPES = [(4, 2), (8, 2)]


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), HEAD_SHAPES)
def test_ragged_steps_match_sdpa(kernels, heads, kv_heads, cache_dtype):
    """Prompts, 1-9-token chunks and single tokens in the same steps, a 200-token prompt arriving
    beside conversations that stream; contexts cross block edges everywhere."""
    layer = PagedLayer(kv_heads, 16, block_size=16, cache_dtype=cache_dtype, seed=heads)
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    rng = random.Random(3)
    steps = [
        [("long", 200), ("a", 5), ("b", 1), ("c", 9)],
        [("long", 1), ("a", 9), ("b", 3), ("c", 1), ("prompt", 200)],
        [(name, rng.randint(1, 9)) for name in ("c", "prompt", "long", "a", "b")],
    ]
    for chunks in steps:
        out, query = layer.step(kernels, chunks, generator, heads)
        assert_matches_sdpa(layer, chunks, out, query)


@pytest.mark.parametrize(
    ("block_size", "tiles"),
    [
        (8, {"block_m": 16, "block_n": 32}),  # a key tile spans four cache blocks; many query tiles
        (64, {"block_m": 32, "block_n": 16}),  # a cache block spans four key tiles
        (16, {"block_m": 64, "block_n": 64}),
    ],
)
def test_tiles_larger_and_smaller_than_a_cache_block(kernels, block_size, tiles):
    layer = PagedLayer(2, 32, block_size=block_size, blocks=40, seed=block_size)
    generator = torch.Generator().manual_seed(block_size)
    for chunks in ([("a", 70), ("b", 3), ("c", 1)], [("a", 9), ("b", 62), ("c", 1), ("d", 17)]):
        out, query = layer.step(kernels, chunks, generator, heads=8, **tiles)
        assert_matches_sdpa(layer, chunks, out, query)


def test_padding_conversations_and_tokens_write_nothing(kernels):
    """A bucketed step's filler: empty conversations (before, between and after the real ones),
    a padding conversation whose tokens read the padding block, and tokens past every conversation.
    None writes the cache (PagedLayer.step checks which slots changed) and the real rows are SDPA's."""
    layer = PagedLayer(2, 16, block_size=16, seed=5)
    generator = torch.Generator().manual_seed(5)
    first = [(PADDING, 0), ("a", 40), (PADDING, 0), (PADDING, 0), ("b", 1), (PADDING, 3), (PADDING, 0)]
    second = [("b", 7), (PADDING, 0), ("a", 1), (PADDING, 0)]
    for chunks in (first, second):
        out, query = layer.step(kernels, chunks, generator, heads=4, padding_tokens=5)
        assert_matches_sdpa(layer, chunks, out, query)
    assert not layer.cache[:, :, : layer.block_size].any()  # the padding block was never written


def test_one_launch_shape_serves_steps_with_new_metadata_in_the_same_buffers(kernels):
    """What a CUDA graph replays: fixed buffers for the query starts, seq_lens and block tables, and
    a fixed token count, refilled for each step. The kernel reads its conversations, tiles and key
    ranges from those buffers, so every step is right with the same grid."""
    layer = PagedLayer(2, 16, block_size=16, seed=9)
    generator = torch.Generator().manual_seed(9)
    conversations, width, tokens = 4, 8, 48
    buffers = PagedTables(
        torch.zeros(conversations + 1, dtype=torch.int32),
        torch.zeros(conversations, dtype=torch.int32),
        torch.zeros(conversations, width, dtype=torch.int32),
    )
    steps = [
        [("a", 30), ("b", 9), ("c", 1), (PADDING, 0)],
        [("a", 1), ("b", 1), ("c", 40), ("d", 2)],
        [("d", 9), (PADDING, 0), (PADDING, 0), (PADDING, 0)],
    ]
    for chunks in steps:
        filler = tokens - sum(length for _, length in chunks)
        _, lengths, seq_lens, tables = layer.metadata(chunks, filler)  # step() derives the same slots
        step_tables = paged_tables(lengths, seq_lens, tables, torch.device("cpu"))
        buffers.query_starts.copy_(step_tables.query_starts)
        buffers.seq_lens.copy_(step_tables.seq_lens)
        buffers.block_tables.zero_()
        buffers.block_tables[:, : step_tables.block_tables.shape[1]].copy_(step_tables.block_tables)
        out, query = layer.step(kernels, chunks, generator, heads=4, padding_tokens=filler, tables=buffers)
        assert out.shape[0] == tokens
        assert_matches_sdpa(layer, chunks, out, query)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_models_store_and_attend_in_their_dtype(kernels, dtype, tolerance):
    """A bfloat16 or float16 model with a cache of its dtype: outputs in that dtype, SDPA's values
    to that dtype's rounding."""
    layer = PagedLayer(2, 16, block_size=16, cache_dtype=dtype, seed=2)
    generator = torch.Generator().manual_seed(2)
    for chunks in ([("a", 50), ("b", 2)], [("a", 3), ("b", 1)]):
        out, query = layer.step(kernels, chunks, generator, heads=4, dtype=dtype)
        assert out.dtype == dtype
        assert_matches_sdpa(layer, chunks, out, query, tolerance)


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16"])
def test_the_engine_with_triton_matches_sdpa(kernels, tiny_model_dir, kv_cache_dtype):
    """Many conversations through the engine (prompts, chunks and single tokens in shared steps):
    every probability the portable backend's, over the same cache."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    expected = run_mixed_batch(model, "sdpa", kv_cache_dtype)
    assert max_difference(run_mixed_batch(model, "triton", kv_cache_dtype), expected) < 1e-5


def test_score_with_triton_matches_sdpa_and_the_reference(tiny_model_dir, tmp_path):
    """`guardstream score --attention-backend triton` in a process of its own, TRITON_INTERPRET=1 in
    its environment from the start: the same probabilities as SDPA and as the independent
    reference (transformers' Qwen3 with the heads written out), fed a few tokens at a time."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    rng = random.Random(4)
    words = ["Hello", "bomb", "How", "to", "Привет", "你好", "123", "?", "weapon", "the"]
    ids = template_messages(
        model,
        [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(30))},
            {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(40))},
        ],
    )
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(ids))
    command = [sys.executable, "-m", "processor.cli", "score", "--model", str(tiny_model_dir)]
    command += ["--ids", str(ids_file), "--device", "cpu", "--dtype", "float32", "--all-heads"]
    command += ["--chunk-size", "7", "--kv-cache-dtype", "float32", "--attention-backend", "triton"]
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    verdicts = [json.loads(line) for line in run.stdout.splitlines()]
    assert [verdict["position"] for verdict in verdicts] == list(range(len(ids)))

    portable = score_ids(
        model, ids, chunk_size=7, all_heads=True, kv_cache_dtype="float32", attention_backend="sdpa"
    )
    reference = ReferenceGuard(tiny_model_dir).probabilities(ids)
    for head in HEAD_KEYS:
        triton_heads = torch.tensor([verdict["heads"][head] for verdict in verdicts])
        sdpa_heads = torch.tensor([verdict.heads[head] for verdict in portable])
        assert (triton_heads - sdpa_heads).abs().max().item() < 1e-5, head
        assert (triton_heads - reference[head]).abs().max().item() < 1e-4, head
    assert [verdict["risk_level"] for verdict in verdicts] == [verdict.risk_level for verdict in portable]


def test_loading_a_model_does_not_import_triton_and_cpu_tensors_need_the_interpreter(tiny_model_dir):
    """Triton comes in only with the backend: importing processor.model, loading a model and running
    an engine on the default backend leave it out. Kernels defined without the interpreter refuse
    CPU tensors, saying what would run them."""
    script = f"""
        import sys
        import torch
        import processor.model
        from processor.engine import EngineConfig, GuardEngine
        from processor.model import load_guard_model

        model = load_guard_model({str(tiny_model_dir)!r}, device="cpu", dtype="float32")
        engine = GuardEngine(model, EngineConfig(kv_cache_bytes=1 << 22))
        engine.submit("a", [1, 2, 3])
        list(engine.run_until_idle())
        assert "triton" not in sys.modules, "triton imported by loading or running a model"

        from processor.model import triton_attention
        cache, key, slots = torch.zeros(2, 2, 64, 16), torch.zeros(1, 2, 16), torch.zeros(1, dtype=torch.long)
        try:
            triton_attention.store_kv(key, key, cache, slots)
        except RuntimeError as error:
            assert "TRITON_INTERPRET=1" in str(error), error
        else:
            raise AssertionError("CPU tensors went to compiled Triton kernels")
    """
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr


def compile_for_a_gpu(capability: int = 90) -> None:
    """Compile the kernels to a cubin for a CUDA GPU of this compute capability (Hopper: 90) with
    Triton's own ptxas, no GPU needed: the shapes and dtypes the engine launches them with. Run in a
    process whose kernels are compiled, not interpreted."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from processor.model import triton_attention as kernels

    assert not kernels.INTERPRETED
    target = GPUTarget("cuda", capability, 32)

    def compile_kernel(function, pointers: dict, integers: dict, constants: dict) -> None:
        signature = {name: f"*{dtype}" for name, dtype in pointers.items()}
        signature |= integers | dict.fromkeys(constants, "constexpr")
        triton.compile(ASTSource(function, signature, constants), target=target, options={"num_warps": 4})

    strides = {"cache_stride_kv": "i64", "cache_stride_head": "i64", "cache_stride_slot": "i32"}
    for dtype, cache in (("bf16", "bf16"), ("fp32", "fp16")):
        compile_kernel(
            kernels._store_kv_kernel,
            {"key_ptr": dtype, "value_ptr": dtype, "cache_ptr": cache, "slot_ptr": "i64"},
            dict.fromkeys(
                ["key_stride_token", "key_stride_head", "value_stride_token", "value_stride_head"], "i32"
            )
            | strides,
            {"KV_HEADS": 8, "HEAD_DIM": 128, "KV_HEADS_PADDED": 8, "HEAD_DIM_PADDED": 128},
        )
    # bfloat16 streaming tiles of the 0.6B shape; float32 over a float16 cache with 4B's groups of 4
    for dtype, cache, group, block_m in (("bf16", "bf16", 2, 16), ("fp32", "fp16", 4, 64)):
        pointers = {"out_ptr": dtype, "query_ptr": dtype, "cache_ptr": cache}
        pointers |= dict.fromkeys(["block_table_ptr", "query_start_ptr", "seq_len_ptr"], "i32")
        integers = {"scale_log2": "fp32"} | strides
        integers |= dict.fromkeys(["conversations", "query_stride_token", "query_stride_head"], "i32")
        integers |= dict.fromkeys(["out_stride_token", "out_stride_head", "table_stride"], "i32")
        constants = {"GROUP": group, "HEAD_DIM": 128, "HEAD_DIM_PADDED": 128, "BLOCK_SIZE": 16}
        constants |= {"BLOCK_M": block_m, "BLOCK_Q": block_m // group, "BLOCK_N": kernels.BLOCK_N}
        compile_kernel(
            kernels._paged_attention_kernel, pointers, integers, constants | {"DOT_FP32": dtype == "fp32"}
        )


def compile_in_a_fresh_process(script: str, cache_dir: Path) -> None:
    """Run `script` where Triton compiles for real: no interpreter, a cache of the test's own."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["TRITON_CACHE_DIR"] = str(cache_dir)
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr


def test_the_kernels_compile_for_a_hopper_gpu(tmp_path):
    """What the interpreter cannot show: the kernels pass Triton's compiler (types, loop-carried
    values, dot shapes) down to a Hopper cubin."""
    compile_in_a_fresh_process(
        "from tests.model.test_triton_attention import compile_for_a_gpu; compile_for_a_gpu()", tmp_path
    )


def test_triton_is_opt_in_and_refused_on_a_cpu_without_the_interpreter(tiny_model_dir, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for device in (cpu, cuda):
        for dtype in (torch.float32, torch.bfloat16):
            assert resolve_attention_backend("auto", device, dtype) != "triton"
    assert resolve_attention_backend("triton", cuda, torch.bfloat16) == "triton"
    with pytest.raises(ValueError, match=r"CUDA device, not cpu.*TRITON_INTERPRET=1"):
        resolve_attention_backend("triton", cpu, torch.float32)
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        GuardEngine(model, EngineConfig(kv_cache_bytes=1 << 22, attention_backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", cpu, torch.float32) == "triton"
