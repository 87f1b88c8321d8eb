"""The CUDA-graph step runner's bucketing, padding and static buffers, on a CPU.

Nothing is captured here: on a CPU the graph runner runs the same padded forward over the same static
buffers eagerly (the Triton kernels under the interpreter; see tests/model/test_triton_attention.py),
so these tests check everything a graph replays except the capture itself, against the unpadded path.
"""

from __future__ import annotations

import random
from array import array
from itertools import accumulate

import pytest
import torch

from processor.engine import EngineConfig, GuardEngine
from processor.engine.cuda_graphs import (
    PADDING_SLOT,
    TOKENS_PER_CONVERSATION,
    Bucket,
    GraphRunner,
    StepBuffers,
    choose_bucket,
    step_buckets,
)
from processor.engine.kv_cache import allocate_kv_cache, bytes_per_token
from processor.engine.step_metadata import StepMetadata, step_metadata
from processor.model import load_guard_model
from processor.model.attention import AttentionBatch, GatherScratch, get_attention_backend, paged_tables
from tests.model.test_triton_attention import compile_in_a_fresh_process, kernels  # noqa: F401 - kernels: a fixture

pytest.importorskip("triton")


def test_buckets_come_largest_first_and_end_at_the_limits():
    """Conversations by powers of two; tokens from one a conversation, by steps of 1.5 and 4/3."""
    buckets = step_buckets(max_conversations=6, max_tokens=40)
    assert buckets == sorted(buckets, reverse=True)
    assert buckets[0] == Bucket(tokens=40, conversations=6)
    assert {b.conversations for b in buckets} == {1, 2, 4, 6}
    assert [b.tokens for b in buckets if b.conversations == 1] == [16, 12, 8, 6, 4, 3, 2, 1]
    assert [b.tokens for b in buckets if b.conversations == 6] == [40, 36, 24, 18, 12, 9, 6]
    for bucket in buckets:
        assert bucket.conversations <= bucket.tokens <= TOKENS_PER_CONVERSATION * bucket.conversations
    with pytest.raises(ValueError, match="at least one conversation"):
        step_buckets(0, 8)


def test_a_step_takes_the_bucket_that_pads_it_least_or_none():
    buckets = step_buckets(max_conversations=8, max_tokens=64)
    assert choose_bucket(buckets, conversations=3, tokens=3) == Bucket(4, 4)
    assert choose_bucket(buckets, conversations=3, tokens=7) == Bucket(8, 4)
    # One conversation's buckets stop at 16 tokens; two conversations' reach 20 at 24.
    assert choose_bucket(buckets, conversations=1, tokens=20) == Bucket(24, 2)
    assert choose_bucket(buckets, conversations=8, tokens=64) == Bucket(64, 8)
    assert choose_bucket(buckets, conversations=9, tokens=9) is None
    assert choose_bucket(buckets, conversations=2, tokens=65) is None


def columns(token_ids, positions, slots, lengths, seq_lens, tables) -> StepMetadata:
    """A StepMetadata of these columns as they are (not necessarily a consistent step)."""
    width = max(map(len, tables))
    padded = [table + [0] * (width - len(table)) for table in tables]
    return StepMetadata(
        torch.tensor(token_ids),
        torch.tensor(positions),
        torch.tensor(slots),
        torch.tensor(lengths),
        torch.tensor([keys - length for keys, length in zip(seq_lens, lengths, strict=True)]),
        torch.tensor([0, *accumulate(lengths)]),
        torch.tensor(seq_lens),
        torch.tensor(padded),
        max(lengths),
        max(seq_lens),
    )


def test_a_smaller_step_after_a_larger_one_leaves_no_stale_metadata_in_its_bucket():
    buffers = StepBuffers(max_conversations=4, max_tokens=16, max_blocks=6, device=torch.device("cpu"))
    large = columns(
        token_ids=list(range(100, 112)),
        positions=list(range(12)),
        slots=list(range(40, 52)),
        lengths=[6, 3, 2, 1],
        seq_lens=[20, 3, 2, 9],
        tables=[[5, 6], [7], [8], [9, 10]],
    )
    buffers.fill(large, Bucket(16, 4))
    small = columns([7, 8, 9], [20, 3, 9], [60, 61, 62], [2, 1], [22, 10], [[5, 6, 11], [9, 10]])
    buffers.fill(small, Bucket(4, 4))
    assert buffers.token_ids[:4].tolist() == [7, 8, 9, 0]
    assert buffers.positions[:4].tolist() == [20, 3, 9, 0]
    assert buffers.slots[:4].tolist() == [60, 61, 62, PADDING_SLOT]
    # Padding conversations start where the real tokens end and hold no keys.
    assert buffers.query_starts.tolist() == [0, 2, 3, 3, 3]
    assert buffers.seq_lens.tolist() == [22, 10, 0, 0]
    assert buffers.block_tables[0, :3].tolist() == [5, 6, 11]
    assert buffers.block_tables[1, :2].tolist() == [9, 10]


def cache_slots(rng: random.Random, blocks: int, block_size: int, count: int) -> list[list[int]]:
    """`count` conversations' block tables over shuffled blocks, `blocks // count` blocks each."""
    order = list(range(blocks))
    rng.shuffle(order)
    each = blocks // count
    return [order[index * each : (index + 1) * each] for index in range(count)]


def test_the_padded_forward_writes_and_returns_what_the_unpadded_one_does(kernels, tiny_model_dir):  # noqa: F811
    """One runner, three steps of different shapes (its buffers refilled each time), each padded to
    its bucket: the same label matrix as the model's own unpadded forward over a copy of the cache,
    and the same cache afterwards, bit for bit: padding tokens and conversations write nothing."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    block_size, blocks = 8, 48
    attend = get_attention_backend("triton")
    runner = GraphRunner(model, attend, block_size, max_conversations=8, max_tokens=64)
    padded_cache = allocate_kv_cache(model.config, blocks, block_size, model.device, torch.float32)
    plain_cache = padded_cache.clone()
    runner.capture(padded_cache)
    rng = random.Random(1)
    tables = cache_slots(rng, blocks, block_size, 6)
    cached = [0] * 6
    # (conversation, new tokens) per step: 3 of 8 conversation slots, then 6, then 1 with a chunk.
    steps = [[(0, 9), (1, 1), (2, 4)], [(0, 1), (1, 3), (2, 1), (3, 7), (4, 2), (5, 1)], [(3, 12)]]
    for chunks in steps:
        token_ids, positions, slots, lengths, seq_lens, step_tables = [], [], [], [], [], []
        for conversation, length in chunks:
            start = cached[conversation]
            token_ids += [rng.randrange(model.config.vocab_size) for _ in range(length)]
            positions += range(start, start + length)
            table = tables[conversation]
            slots += [
                table[p // block_size] * block_size + p % block_size for p in range(start, start + length)
            ]
            lengths.append(length)
            seq_lens.append(start + length)
            step_tables.append(table[: -(-(start + length) // block_size)])
            cached[conversation] += length
        starts = [keys - length for keys, length in zip(seq_lens, lengths, strict=True)]
        step = step_metadata(token_ids, starts, lengths, [array("q", t) for t in step_tables], block_size)
        padded = runner.run(step, with_probabilities=True)
        assert padded is not None

        batch = AttentionBatch(
            torch.tensor(slots),
            [],
            block_size,
            GatherScratch(),
            tables=paged_tables(lengths, seq_lens, step_tables, model.device),
        )
        with torch.inference_mode():
            logits = model.network(
                torch.tensor(token_ids), torch.tensor(positions), plain_cache, batch, attend
            )
        plain = logits.label_matrix(with_probabilities=True)
        assert padded.shape == plain.shape
        assert torch.equal(padded[:, 0:8:2], plain[:, 0:8:2])  # classes
        assert (padded - plain).abs().max().item() < 1e-5
        assert torch.equal(padded_cache, plain_cache)
    assert runner.graph_steps == len(steps)


def engine(model, graphs: bool, **limits) -> GuardEngine:
    return GuardEngine(
        model,
        EngineConfig(
            block_size=8,
            kv_cache_bytes=2048 * bytes_per_token(model.config, model.dtype),
            attention_backend="triton",
            kv_cache_dtype="float32",
            keep_probabilities=True,
            cuda_graphs=graphs,
            **limits,
        ),
    )


def test_the_engine_with_graph_steps_matches_it_without(kernels, tiny_model_dir):  # noqa: F811
    """Prompts, chunks and single tokens of six conversations in shared steps, through an engine
    whose buckets hold at most four conversations and 32 tokens: the steps that fit replay the padded
    forward, the rest run eagerly, and every label and probability is the eager engine's."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    graphed = engine(model, True, cuda_graph_max_conversations=4, cuda_graph_max_tokens=32)
    eager = engine(model, False)
    rng = random.Random(11)
    conversations = {f"c{i}": [rng.randrange(150_000) for _ in range(rng.randint(5, 60))] for i in range(6)}
    fed = dict.fromkeys(conversations, 0)
    compared = 0
    while any(fed[name] < len(tokens) for name, tokens in conversations.items()):
        # A varying subset each round, so that steps take different buckets and some fit none.
        for name in rng.sample(sorted(conversations), rng.randint(1, 6)):
            tokens, size = conversations[name], rng.choice([1, 1, 2, 5, 30])
            if fed[name] < len(tokens):
                for target in (graphed, eager):
                    target.submit(name, tokens[fed[name] : fed[name] + size])
                fed[name] += size
        for left, right in zip(graphed.run_until_idle(), eager.run_until_idle(), strict=True):
            assert (left.conversation_id, left.start_position) == (
                right.conversation_id,
                right.start_position,
            )
            assert left.response.risk_level == right.response.risk_level
            assert left.query.category == right.query.category
            for head, rows in right.probabilities.items():
                assert (torch.tensor(left.probabilities[head]) - torch.tensor(rows)).abs().max() < 1e-5
            compared += 1
    stats = graphed.stats()
    assert compared > 0 and stats.graph_steps > 0 and stats.eager_steps > 0
    assert eager.stats().graph_steps == 0


def test_graphs_need_the_triton_backend_and_auto_picks_it(kernels, tiny_model_dir):  # noqa: F811
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    config = EngineConfig(kv_cache_bytes=1 << 22, attention_backend="sdpa", cuda_graphs=True)
    with pytest.raises(ValueError, match="--attention-backend triton"):
        GuardEngine(model, config)
    automatic = GuardEngine(model, EngineConfig(kv_cache_bytes=1 << 22, cuda_graphs=True))
    assert automatic.attention_backend == "triton" and automatic.runner.graphs is not None


def compile_graph_signatures(capability: int = 90) -> None:
    """Compile the KV store as the graph runner launches it, with int32 slots from the static buffers
    (the eager path sends int64), to a cubin for a CUDA GPU of this compute capability, no GPU needed.
    Run in a process whose kernels are compiled, not interpreted."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from processor.model import triton_attention

    assert not triton_attention.INTERPRETED
    signature = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*bf16", "slot_ptr": "*i32"}
    for name in ("key_stride_token", "key_stride_head", "value_stride_token", "value_stride_head"):
        signature[name] = "i32"
    signature |= {"cache_stride_kv": "i64", "cache_stride_head": "i64", "cache_stride_slot": "i32"}
    constants = {"KV_HEADS": 8, "HEAD_DIM": 128, "KV_HEADS_PADDED": 8, "HEAD_DIM_PADDED": 128}
    signature |= dict.fromkeys(constants, "constexpr")
    source = ASTSource(triton_attention._store_kv_kernel, signature, constants)
    triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})


def test_the_kv_store_compiles_for_a_hopper_gpu_with_the_graphs_int32_slots(tmp_path):
    compile_in_a_fresh_process(
        "from tests.engine.test_cuda_graphs import compile_graph_signatures as c; c()", tmp_path
    )
