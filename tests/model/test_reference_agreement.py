"""Our network (whole sequence and incremental over the paged cache) against the independent reference."""

from __future__ import annotations

import random

import pytest
import torch

from processor.model import load_guard_model
from processor.score import score_ids, template_messages
from tests.model.reference import HEAD_KEYS, ReferenceGuard

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def conversation_ids(small_model_dir) -> list[int]:
    """Several hundred tokens: two templated turns of random text plus template tokens."""
    rng = random.Random(7)
    words = ["Hello", "bomb", "How", "to", "Привет", "你好", "123", "?", "!", "\n", "weapon", "recipe", "the"]
    model = load_guard_model(small_model_dir, device="cpu")
    messages = [
        {"role": "user", "content": " ".join(rng.choice(words) for _ in range(120))},
        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(160))},
    ]
    ids = template_messages(model, messages)
    assert len(ids) > 300
    return ids


@pytest.fixture(scope="module")
def reference_probabilities(small_model_dir, conversation_ids) -> dict[str, torch.Tensor]:
    return ReferenceGuard(small_model_dir).probabilities(conversation_ids)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 64])
def test_all_four_heads_match_reference(
    small_model_dir, conversation_ids, reference_probabilities, chunk_size
):
    """With an exact (float32) cache, every head's probabilities are the reference's, however fed."""
    model = load_guard_model(small_model_dir, device="cpu", dtype="float32")
    verdicts = score_ids(
        model, conversation_ids, chunk_size=chunk_size, all_heads=True, kv_cache_dtype="float32"
    )
    assert [verdict.position for verdict in verdicts] == list(range(len(conversation_ids)))
    assert max_difference(verdicts, reference_probabilities) < TOLERANCE


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_the_default_float16_cache_stays_close_to_the_reference(
    small_model_dir, conversation_ids, reference_probabilities, chunk_size
):
    """The CPU default (auto: a float16 cache for the C kernel) rounds each key and value once: the
    probabilities move, within 1e-3 of the reference."""
    model = load_guard_model(small_model_dir, device="cpu", dtype="float32")
    verdicts = score_ids(model, conversation_ids, chunk_size=chunk_size, all_heads=True)
    assert TOLERANCE / 100 < max_difference(verdicts, reference_probabilities) < 1e-3


def max_difference(verdicts, reference_probabilities) -> float:
    return max(
        (torch.tensor([verdict.heads[head] for verdict in verdicts]) - reference_probabilities[head])
        .abs()
        .max()
        .item()
        for head in HEAD_KEYS
    )


def test_labels_follow_role_heads(small_model_dir, conversation_ids, reference_probabilities):
    """User positions read the query heads, assistant positions the response heads; Safe has no category."""
    model = load_guard_model(small_model_dir, device="cpu")
    verdicts = score_ids(
        model, conversation_ids, kv_cache_dtype="float32"
    )  # exact: argmax as the reference's
    roles = {verdict.role for verdict in verdicts}
    assert roles == {"user", "assistant"}
    for verdict in verdicts:
        prefix = "query_" if verdict.role == "user" else ""
        level_names, _ = model.labels.for_role(verdict.role)
        expected_level = reference_probabilities[f"{prefix}risk"][verdict.position].argmax().item()
        assert verdict.risk_level == level_names[expected_level]
        if verdict.risk_level == "Safe":
            assert verdict.category is None
        else:
            _, category_names = model.labels.for_role(verdict.role)
            expected = reference_probabilities[f"{prefix}category"][verdict.position].argmax().item()
            assert verdict.category == category_names[expected]
