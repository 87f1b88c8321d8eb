"""Explicit statuses at the context limit and at the cache limit: no crash, no silent truncation."""

from __future__ import annotations

import json
import shutil

import pytest

from processor.engine import ChunkStatus
from processor.model import load_guard_model
from tests.engine.engines import engine_for


@pytest.fixture(scope="module")
def short_context_model(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with max_position_embeddings lowered to 40."""
    folder = tmp_path_factory.mktemp("short-context")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, folder / file.name)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    return load_guard_model(folder, device="cpu")


def test_chunk_past_the_context_limit_gets_a_status_and_the_conversation_keeps_its_state(short_context_model):
    engine = engine_for(short_context_model, 64)
    engine.submit("c", list(range(100, 130)))
    (first,) = engine.run_until_idle()
    assert first.status is ChunkStatus.OK and len(first.response.risk_level) == 30
    engine.submit("c", list(range(200, 215)))  # 30 + 15 > 40
    (second,) = engine.run_until_idle()
    assert second.status is ChunkStatus.CONTEXT_EXCEEDED
    assert second.response.risk_level == [] and second.start_position == 30
    engine.submit("c", list(range(300, 310)))  # still fits exactly: 40 positions
    (third,) = engine.run_until_idle()
    assert third.status is ChunkStatus.OK and third.start_position == 30


def test_conversation_larger_than_the_whole_cache_is_reported(tiny_model_dir):
    model = load_guard_model(tiny_model_dir, device="cpu")
    engine = engine_for(model, 32)
    engine.submit("big", list(range(1000, 1040)))
    engine.submit("small", list(range(1000, 1010)))
    results = {result.conversation_id: result for result in engine.run_until_idle()}
    assert results["big"].status is ChunkStatus.EXCEEDS_CACHE
    assert results["small"].status is ChunkStatus.OK
