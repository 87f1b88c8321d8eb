"""Every attention backend gives the portable one's results on the same ragged, paged batch."""

from __future__ import annotations

import random

import pytest
import torch

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token
from processor.model import load_guard_model
from processor.model.attention import ATTENTION_BACKENDS, CPU_ONLY_BACKENDS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    (backend, device)
    for backend in sorted(set(ATTENTION_BACKENDS) - {"sdpa"})
    for device in DEVICES
    if device == "cpu" or backend not in CPU_ONLY_BACKENDS
]


def run_mixed_batch(model, backend: str) -> dict[str, list[float]]:
    rng = random.Random(11)
    engine = GuardEngine(
        model,
        EngineConfig(
            block_size=8,
            kv_cache_bytes=2048 * bytes_per_token(model.config, model.dtype),
            attention_backend=backend,
            keep_probabilities=True,
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
