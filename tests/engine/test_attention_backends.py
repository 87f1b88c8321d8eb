"""Every attention backend gives the portable one's results on the same ragged, paged batch."""

from __future__ import annotations

import random

import pytest
import torch

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token
from processor.model import load_guard_model
from processor.model.attention import ATTENTION_BACKENDS, CPU_ONLY_BACKENDS, CUDA_BACKENDS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    (backend, device)
    for backend in sorted(set(ATTENTION_BACKENDS) - {"sdpa"})
    for device in DEVICES
    # Triton on a CPU runs in its interpreter, checked by tests/model/test_triton_attention.py.
    if backend not in (CUDA_BACKENDS if device == "cpu" else CPU_ONLY_BACKENDS)
]


def run_mixed_batch(model, backend: str, kv_cache_dtype: str = "float32") -> dict[str, list[float]]:
    rng = random.Random(11)
    engine = GuardEngine(
        model,
        EngineConfig(
            block_size=8,
            kv_cache_bytes=2048 * bytes_per_token(model.config, model.dtype),
            attention_backend=backend,
            keep_probabilities=True,
            kv_cache_dtype=kv_cache_dtype,
        ),
    )
    conversations = {
        f"c{index}": [rng.randrange(150_000) for _ in range(rng.randint(5, 120))] for index in range(6)
    }
    probabilities: dict[str, list[list[float]]] = {name: [] for name in conversations}
    # Prompts first, then a mix of single tokens and chunks, all in shared steps.
    fed = dict.fromkeys(conversations, 0)
    while any(fed[name] < len(tokens) for name, tokens in conversations.items()):
        for name, tokens in conversations.items():
            size = rng.choice([1, 1, 4, 30])
            if fed[name] < len(tokens):
                engine.submit(name, tokens[fed[name] : fed[name] + size])
                fed[name] += size
        for result in engine.run_until_idle():
            probabilities[result.conversation_id] += result.probabilities["risk"]
    return probabilities


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_backend_matches_portable_sdpa(tiny_model_dir, backend, device):
    model = load_guard_model(tiny_model_dir, device=device, dtype="float32")
    expected = run_mixed_batch(model, "sdpa")
    actual = run_mixed_batch(model, backend)
    for name in expected:
        difference = (torch.tensor(actual[name]) - torch.tensor(expected[name])).abs().max().item()
        assert difference < 1e-4, f"{backend} on {device}, {name}: {difference}"


def max_difference(actual: dict[str, list[float]], expected: dict[str, list[float]]) -> float:
    return max(
        (torch.tensor(actual[name]) - torch.tensor(expected[name])).abs().max().item() for name in expected
    )


@pytest.mark.parametrize("backend", sorted(set(ATTENTION_BACKENDS) - {"sdpa"} - CUDA_BACKENDS))
def test_a_float16_cache_reads_the_same_in_every_backend(tiny_model_dir, backend):
    """The C kernel reads float16 keys and values natively, SDPA and flex widen them first: the same
    rounded cache, the same results."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    expected = run_mixed_batch(model, "sdpa", "float16")
    assert max_difference(run_mixed_batch(model, backend, "float16"), expected) < 1e-4


def test_a_float16_cache_rounds_but_stays_close_to_the_exact_one(tiny_model_dir):
    """The price of half the bytes: every key and value rounded once (float16 keeps 11 bits), so the
    probabilities move a little, not much; and the same budget holds twice the tokens."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    exact = run_mixed_batch(model, "paged_cpu")
    rounded = run_mixed_batch(model, "paged_cpu", "float16")
    assert 0 < max_difference(rounded, exact) < 1e-3  # 1.8e-4 on the tiny model
    budget = 4096 * bytes_per_token(model.config, torch.float32)
    engines = [
        GuardEngine(model, EngineConfig(kv_cache_bytes=budget, kv_cache_dtype=name))
        for name in ("float32", "float16")
    ]
    assert engines[1].stats().blocks_free == 2 * engines[0].stats().blocks_free
    with pytest.raises(ValueError, match="unknown KV cache dtype 'half'"):
        GuardEngine(model, EngineConfig(kv_cache_bytes=budget, kv_cache_dtype="half"))


def test_auto_stores_float16_for_the_kernel_and_the_model_dtype_elsewhere(tiny_model_dir):
    """ "auto" is float16 where the C kernel does the attention (its read of the cache is most of a
    streaming step's attention) and the model's dtype for the other backends, which would widen it."""
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    budget = 4096 * bytes_per_token(model.config, torch.float32)
    kernel = GuardEngine(model, EngineConfig(kv_cache_bytes=budget, attention_backend="paged_cpu"))
    portable = GuardEngine(model, EngineConfig(kv_cache_bytes=budget, attention_backend="sdpa"))
    assert kernel.stats().kv_bytes_per_token * 2 == portable.stats().kv_bytes_per_token
    assert (
        max_difference(
            run_mixed_batch(model, "paged_cpu", "auto"), run_mixed_batch(model, "paged_cpu", "float16")
        )
        == 0
    )
