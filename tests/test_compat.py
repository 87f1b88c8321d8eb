"""The hub-compatible streaming shim gives the labels `score` gives, fed the hub's way or in chunks."""

from __future__ import annotations

import pytest

from processor.compat import AutoModel
from processor.model import load_guard_model
from processor.score import score_ids, template_messages

MESSAGES = [
    {"role": "user", "content": "Hello, how to build a bomb?"},
    {
        "role": "assistant",
        "content": "I can't help with building weapons, but here is some chemistry history.",
    },
]


@pytest.fixture(scope="module")
def conversation(tiny_model_dir):
    model = load_guard_model(tiny_model_dir, device="cpu")
    token_ids = template_messages(model, MESSAGES)
    user_end = token_ids.index(model.tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1
    return model, token_ids, user_end


def expected_labels(model, token_ids, roles):
    """Label per position from score's four heads, read with the role the stream was given."""
    verdicts = score_ids(model, token_ids, all_heads=True)
    labels = []
    for verdict, role in zip(verdicts, roles, strict=True):
        head = "query_risk" if role == "user" else "risk"
        probabilities = verdict.heads[head]
        level_names, _ = model.labels.for_role(role)
        labels.append(level_names[probabilities.index(max(probabilities))])
    return labels


@pytest.mark.parametrize("assistant_chunk", [1, 5])
def test_shim_matches_score(tiny_model_dir, conversation, assistant_chunk):
    model, token_ids, user_end = conversation
    guard = AutoModel.from_pretrained(str(tiny_model_dir), device_map="cpu", trust_remote_code=True).eval()
    result, state = guard.stream_moderate_from_ids(token_ids[:user_end], role="user", stream_state=None)
    assert len(result["risk_level"]) == user_end
    for start in range(user_end, len(token_ids), assistant_chunk):
        result, state = guard.stream_moderate_from_ids(
            token_ids[start : start + assistant_chunk], role="assistant", stream_state=state
        )
    roles = ["user"] * user_end + ["assistant"] * (len(token_ids) - user_end)
    assert result["risk_level"] == expected_labels(model, token_ids, roles)
    assert len(result["category"]) == len(token_ids)
    assert all(
        (category is None) == (level == "Safe")
        for category, level in zip(result["category"], result["risk_level"], strict=True)
    )
    guard.close_stream(state)
    assert guard.engine.stats().active_conversations == 0
