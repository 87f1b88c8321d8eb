"""Model test fixtures. The checkpoints (tiny_model_dir, small_model_dir) live in tests/conftest.py."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    # build_qwen3_tokenizer caches the converted vocabulary, so later builds in the session are cheap too.
    from processor.model.tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
