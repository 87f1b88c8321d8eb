"""The C paged-attention kernel against dense causal attention written out in torch, and its build.

CI installs a C compiler (.ci/run), so a kernel that does not build here fails these tests.
"""

from __future__ import annotations

import ctypes
import platform
import random

import pytest
import torch

from processor.model import cpu_kernel
from processor.model.attention import resolve_attention_backend


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.PagedAttentionKernel:
    built = cpu_kernel.load()
    assert built is not None, "the CPU kernel did not build (is a C compiler installed?)"
    return built


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float):
    """query [Q, heads, D] at positions start.., keys/values [start + Q, kv_heads, D] -> [Q, heads, D]."""
    length, heads, _ = query.shape
    group = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), keys.double()) * scale
    positions = torch.arange(start, start + length)[:, None]
    scores = scores.masked_fill(torch.arange(keys.shape[0])[None, :] > positions, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values.double()).float()


class PagedLayer:
    """One layer's cache with conversations in shuffled blocks, fed chunk by chunk through the kernel."""

    def __init__(
        self,
        kernel,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        blocks: int,
        seed: int,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.kernel, self.block_size = kernel, block_size
        self.cache = torch.zeros(2, kv_heads, blocks * block_size, head_dim, dtype=cache_dtype)
        self.free = list(range(1, blocks))  # block 0 left unused, as the engine's padding block
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, chunks: dict[str, int], query, key, value, scale: float) -> torch.Tensor:
        """Feed `chunks` (conversation -> new tokens, packed in this order) in one kernel call."""
        rows, tables, slots, row = [], [], [], 0
        for conversation, length in chunks.items():
            start = self.lengths.get(conversation, 0)
            table = self.tables.setdefault(conversation, [])
            while len(table) * self.block_size < start + length:
                table.append(self.free.pop())
            rows.append((row, start, length, len(tables)))
            tables += table
            slots += [
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, start + length)
            ]
            self.lengths[conversation] = start + length
            row += length
        heads, head_dim = query.shape[1:]
        chunk_table = torch.tensor(rows, dtype=torch.long)
        size = self.kernel.scratch_floats(
            heads,
            self.cache.shape[1],
            head_dim,
            self.block_size,
            max(chunks.values()),
            max(self.lengths[c] for c in chunks),
        )
        buffers: dict[int, torch.Tensor] = {}  # one per thread
        return self.kernel.attend(
            query,
            key,
            value,
            self.cache,
            torch.tensor(slots, dtype=torch.long),
            chunk_table,
            torch.tensor(tables, dtype=torch.long),
            self.block_size,
            scale,
            cpu_kernel.split_by_work(chunk_table, torch.get_num_threads()),
            lambda part: buffers.setdefault(part, torch.empty(size)),
        )


CACHE_DTYPES = [torch.float32, torch.float16]


def stored(tensor: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `cache_dtype` holds of a float32 tensor: rounded to it once."""
    return tensor.to(cache_dtype).float()


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize(
    ("block_size", "head_dim", "heads", "kv_heads"),
    # 18: head dimensions past the tiles' partial sums, and past a vector of 16
    [
        (16, 16, 4, 2),
        (8, 16, 4, 2),
        (16, 32, 8, 4),
        (32, 24, 4, 4),
        (4, 128, 16, 8),
        (16, 8, 2, 1),
        (16, 18, 4, 2),
    ],
)
def test_kernel_matches_dense_causal_attention(kernel, block_size, head_dim, heads, kv_heads, cache_dtype):
    """Prompts, then steps of 1 to 40 new tokens per conversation, across block boundaries; every
    output equals dense attention over the conversation's whole sequence so far (over the keys and
    values as the cache holds them: a float16 cache rounds each once, and nothing else changes)."""
    check_against_dense(kernel, block_size, head_dim, heads, kv_heads, cache_dtype)


def x86_targets() -> list[str]:
    """Older instruction sets this CPU can run (gcc -march names): the kernel's paths for them."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    features = set(cpu_kernel._cpu_features().decode().split())
    return ["x86-64", *(["haswell"] if {"avx2", "f16c", "fma"} <= features else [])]


@pytest.mark.parametrize("target", x86_targets())
def test_builds_for_older_cpus_match_dense_attention(tmp_path, target):
    """An AVX2 build (8 floats a vector, F16C conversions) and a baseline x86-64 one (no AVX: the
    compiler's generic vectors and _Float16) give dense attention's numbers too: this machine's own
    build is only one of the paths users' CPUs take."""
    built = cpu_kernel.PagedAttentionKernel(ctypes.CDLL(str(cpu_kernel.build(tmp_path, target))))
    for cache_dtype in CACHE_DTYPES:
        check_against_dense(built, 16, 16, 4, 2, cache_dtype)
        check_against_dense(built, 8, 24, 4, 4, cache_dtype)


def test_sharp_attention_matches_dense_attention(kernel):
    """Scores spread over hundreds (queries 30x larger): the weights of keys far below a row's best
    are exactly 0 in the kernel (below exp(-64) of the best, past float32's resolution of the sum),
    and the output is still dense attention's."""
    for cache_dtype in CACHE_DTYPES:
        check_against_dense(kernel, 16, 16, 4, 2, cache_dtype, query_scale=30.0)


def test_a_dominant_key_anywhere_in_a_long_row_takes_all_the_weight(kernel):
    """One key scoring ~150 above the rest, at each position of a 150-key row in turn: every position
    must reach the row's maximum (a maximum that missed it would leave exp(150) to overflow), so the
    output is that key's value, as dense attention says."""
    context, heads, kv_heads, head_dim = 150, 4, 2, 16
    generator = torch.Generator().manual_seed(11)
    for position in range(context):
        layer = PagedLayer(kernel, kv_heads, head_dim, 16, blocks=40, seed=position)
        key = torch.randn(context, kv_heads, head_dim, generator=generator) * 0.1
        value = torch.randn(context, kv_heads, head_dim, generator=generator)
        key[position] = 1.0
        query = torch.full((context, heads, head_dim), 40.0)  # scores 40 * 16 * 0.25 = 160 at `position`
        out = layer.step({"a": context}, query, key, value, 0.25)
        expected = dense_attention(query, key, value, 0, 0.25)
        assert torch.isfinite(out).all(), f"position {position}"
        assert torch.allclose(out[-1], expected[-1], atol=1e-5), f"position {position}"


def check_against_dense(
    kernel, block_size, head_dim, heads, kv_heads, cache_dtype, query_scale: float = 1.0
) -> None:
    assert cache_dtype in kernel.cache_dtypes, f"this build of the kernel cannot read a {cache_dtype} cache"
    rng = random.Random(block_size * 1000 + head_dim)
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    seed = rng.randrange(1 << 30)
    layer = PagedLayer(kernel, kv_heads, head_dim, block_size, blocks=400, seed=seed, cache_dtype=cache_dtype)
    scale = head_dim**-0.5
    history: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    conversations = [f"c{index}" for index in range(5)]
    for step in range(6):
        sizes = [1, 1, 2, 7, block_size + 3, 40]
        lengths = {c: rng.choice(sizes) for c in conversations if rng.random() < 0.9}
        if not lengths:
            continue
        total = sum(lengths.values())
        query = torch.randn(total, heads, head_dim, generator=generator) * query_scale
        key = torch.randn(total, kv_heads, head_dim, generator=generator)
        value = torch.randn(total, kv_heads, head_dim, generator=generator)
        out = layer.step(lengths, query, key, value, scale)
        row = 0
        for conversation, length in lengths.items():
            keys, values = history.get(conversation, (key[:0], value[:0]))
            keys = torch.cat([keys, stored(key[row : row + length], cache_dtype)])
            values = torch.cat([values, stored(value[row : row + length], cache_dtype)])
            history[conversation] = (keys, values)
            start = keys.shape[0] - length
            expected = dense_attention(query[row : row + length], keys, values, start, scale)
            actual = out[row : row + length]
            assert torch.allclose(actual, expected, atol=2e-5, rtol=1e-4), (
                f"step {step}, {conversation}: {(actual - expected).abs().max().item()}"
            )
            row += length


def test_threads_split_the_chunks_and_give_the_same_output(kernel):
    """With torch on several threads the chunks run in parts at once: the same numbers, bit for bit."""
    outputs = []
    for threads in (1, 3):
        generator = torch.Generator().manual_seed(5)
        layer = PagedLayer(kernel, 2, 16, 16, blocks=200, seed=1)
        lengths = {f"c{index}": 1 + (index * 7) % 40 for index in range(9)}
        total = sum(lengths.values())
        tensors = [torch.randn(total, heads, 16, generator=generator) for heads in (4, 2, 2)]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outputs.append(layer.step(lengths, *tensors, 0.25))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])


def test_split_by_work_gives_contiguous_runs_of_about_equal_work():
    # rows: first row, start, length, table offset; work = length x (start + length)
    chunks = torch.tensor([[0, 99, 1, 0]] * 6 + [[0, 0, 20, 0]] * 2, dtype=torch.long)  # 100 each, 400 each
    assert cpu_kernel.split_by_work(chunks, 1) == [(0, 8)]
    parts = cpu_kernel.split_by_work(chunks, 2)
    assert parts == [(0, 7), (7, 8)]  # 1,000 and 400 of 1,400: the cut closest past half
    assert cpu_kernel.split_by_work(chunks[:1], 4) == [(0, 1)]
    many = cpu_kernel.split_by_work(chunks, 8)
    assert [first for first, _ in many] == [last for _, last in [(0, 0), *many[:-1]]]  # contiguous
    assert many[-1][1] == 8 and all(last > first for first, last in many)


def test_tensors_the_kernel_cannot_read_are_refused_not_read(kernel):
    layer = PagedLayer(kernel, 2, 16, 16, blocks=8, seed=0)
    query, key, value = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="float32"):
        layer.step({"a": 3}, query.double(), key, value, 0.25)
    with pytest.raises(ValueError, match="key and value"):
        layer.step({"b": 3}, query, key[:, :1], value[:, :1], 0.25)
    layer.cache = layer.cache.transpose(2, 3)  # [2, kv_heads, head_dim, slots]: a view, not contiguous
    with pytest.raises(ValueError, match="kv_layer"):
        layer.step({"c": 3}, query, key, value, 0.25)
    layer.cache = torch.zeros(2, 2, 8 * 16, 16, dtype=torch.bfloat16)  # a dtype it has no reader for
    with pytest.raises(ValueError, match=r"cache, not torch\.bfloat16"):
        layer.step({"d": 3}, query, key, value, 0.25)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_keys_are_stored_transposed_within_their_block_and_values_as_rows(kernel, cache_dtype):
    """The cache layout the kernel's reads rely on (and that no other backend reads)."""
    block_size, head_dim = 4, 16
    layer = PagedLayer(kernel, 2, head_dim, block_size, blocks=8, seed=0, cache_dtype=cache_dtype)
    key = torch.randn(6, 2, head_dim)
    value = torch.randn(6, 2, head_dim)
    layer.step({"a": 6}, torch.randn(6, 4, head_dim), key, value, 0.25)
    table = layer.tables["a"]
    for position in range(6):
        block, offset = table[position // block_size], position % block_size
        slots = slice(block * block_size, (block + 1) * block_size)
        key_block = layer.cache[0, :, slots].reshape(2, head_dim, block_size)
        assert torch.equal(key_block[:, :, offset], key[position].to(cache_dtype))
        assert torch.equal(layer.cache[1, :, block * block_size + offset], value[position].to(cache_dtype))


def test_build_is_cached_by_source_flags_and_cpu(tmp_path):
    first = cpu_kernel.build(tmp_path)
    modified = first.stat().st_mtime_ns
    assert cpu_kernel.build(tmp_path) == first
    assert first.stat().st_mtime_ns == modified  # not rebuilt
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no build leftovers


def test_workers_starting_together_build_one_library(tmp_path):
    """Each build writes into a folder of its own and renames the result into place: concurrent
    builders (workers starting on one host) all get a whole library, and one file is left."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: cpu_kernel.build(tmp_path), range(4)))
    assert len(set(built)) == 1
    assert [path.name for path in tmp_path.iterdir()] == [built[0].name]
    assert cpu_kernel.PagedAttentionKernel(ctypes.CDLL(str(built[0]))).scratch_floats(4, 2, 16, 16, 1, 16) > 0


def test_build_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cpu_kernel.KernelUnavailableError, match="no C compiler"):
        cpu_kernel.build(tmp_path)


def test_auto_picks_the_kernel_on_a_cpu_in_float32_and_sdpa_elsewhere(monkeypatch, kernel):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_backend("auto", cpu, torch.float32) == "paged_cpu"
    assert resolve_attention_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention_backend("auto", cuda, torch.float32) == "sdpa"
    assert resolve_attention_backend("sdpa", cpu, torch.float32) == "sdpa"
    assert resolve_attention_backend("auto", cpu, torch.float32, torch.float16) == "paged_cpu"
    assert resolve_attention_backend("auto", cpu, torch.float32, torch.bfloat16) == "sdpa"  # no reader
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)  # a machine without a compiler
    assert resolve_attention_backend("auto", cpu, torch.float32) == "sdpa"
    with pytest.raises(cpu_kernel.KernelUnavailableError):  # asked for by name: an error at start
        resolve_attention_backend("paged_cpu", cpu, torch.float32)


def test_paged_cpu_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="CPU in float32"):
        resolve_attention_backend("paged_cpu", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="CPU in float32"):
        resolve_attention_backend("paged_cpu", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("fast", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"KV cache, not torch\.bfloat16"):
        resolve_attention_backend("paged_cpu", torch.device("cpu"), torch.float32, torch.bfloat16)
