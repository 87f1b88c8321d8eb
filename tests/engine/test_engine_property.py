"""Property: however conversations interleave, chunk and get evicted, every per-token result equals
the whole-sequence forward of that conversation (independent reference: transformers' Qwen3Model)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.engine import AsyncGuardEngine, EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token
from processor.model import load_guard_model
from tests.model.reference import HEAD_KEYS, ReferenceGuard

TOLERANCE = 1e-4
BLOCK_SIZE = 8
CACHE_BLOCKS = 24  # 192 token slots: far fewer than the conversations below need together


class RecordedHistory:
    """The caller's durable token log (Redis in the worker): everything fed, per conversation."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.loads = 0

    async def load(self, conversation_id: str, length: int) -> list[int]:
        self.loads += 1
        return self.tokens.get(conversation_id, [])[:length]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_guard_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return ReferenceGuard(tiny_model_dir)


def small_cache_engine(model) -> GuardEngine:
    return GuardEngine(
        model,
        EngineConfig(
            block_size=BLOCK_SIZE,
            kv_cache_bytes=CACHE_BLOCKS * BLOCK_SIZE * bytes_per_token(model.config, model.dtype),
            max_batch_tokens=48,
            max_batch_conversations=3,
            keep_probabilities=True,
            kv_cache_dtype="float32",  # exact: compared with the reference at TOLERANCE
        ),
    )


async def play(
    model, conversations: dict[str, list[int]], rng: random.Random
) -> tuple[dict, GuardEngine, int]:
    engine = small_cache_engine(model)
    history = RecordedHistory()
    front = AsyncGuardEngine(engine, history)
    fed = dict.fromkeys(conversations, 0)
    results: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in conversations}

    async def feed(name: str, chunks: list[int]) -> None:
        for size in chunks:  # one conversation's chunks in order; other conversations run alongside
            start = fed[name]
            tokens = conversations[name][start : start + size]
            fed[name] += len(tokens)
            history.tokens[name] = conversations[name][: fed[name]]
            result = await front.moderate(name, tokens, start)
            assert result.start_position == start and result.token_ids == tokens
            for offset in range(len(tokens)):
                results[name][start + offset] = {
                    head: result.probabilities[head][offset] for head in HEAD_KEYS
                }

    while any(fed[name] < len(tokens) for name, tokens in conversations.items()):
        active = [name for name, tokens in conversations.items() if fed[name] < len(tokens)]
        round_plan = {}
        for name in rng.sample(active, rng.randint(1, len(active))):
            remaining, chunks = len(conversations[name]) - fed[name], []
            for _ in range(rng.randint(1, 2)):
                size = min(remaining, rng.choice([1, 1, 2, 3, 7, 20, 60]))
                if size:
                    chunks.append(size)
                    remaining -= size
            round_plan[name] = chunks
        await asyncio.gather(*(feed(name, chunks) for name, chunks in round_plan.items()))
        for name in conversations:
            if rng.random() < 0.15:  # an explicit eviction, as a rebalance or end would cause
                await front.release(name)
    await front.close()
    return results, engine, history.loads


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=110), min_size=2, max_size=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_any_interleaving_chunking_and_eviction_matches_whole_sequence(tiny_model, reference, lengths, seed):
    rng = random.Random(seed)
    conversations = {
        f"c{index}": [rng.randrange(150_000) for _ in range(n)] for index, n in enumerate(lengths)
    }
    results, _engine, _loads = asyncio.run(play(tiny_model, conversations, rng))
    for name, tokens in conversations.items():
        expected = reference.probabilities(tokens)
        assert sorted(results[name]) == list(range(len(tokens))), "every position answered exactly once"
        for head in HEAD_KEYS:
            ours = torch.tensor([results[name][position][head] for position in range(len(tokens))])
            difference = (ours - expected[head]).abs().max().item()
            assert difference < TOLERANCE, f"{name} {head}: {difference}"


def test_cache_smaller_than_the_active_set_evicts_and_rebuilds(tiny_model, reference):
    rng = random.Random(3)
    conversations = {f"c{index}": [rng.randrange(150_000) for _ in range(90)] for index in range(6)}
    results, engine, loads = asyncio.run(play(tiny_model, conversations, rng))
    stats = engine.stats()
    assert stats.evictions > 0 and stats.rebuilt_tokens > 0 and loads > 0
    for name, tokens in conversations.items():
        expected = reference.probabilities(tokens)["risk"]
        ours = torch.tensor([results[name][position]["risk"] for position in range(len(tokens))])
        assert (ours - expected).abs().max().item() < TOLERANCE
