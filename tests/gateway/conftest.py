"""Gateway test fixtures: the real-vocabulary Qwen3 tokenizer (built offline once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from processor.model.tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
