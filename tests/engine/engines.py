"""Engines for the engine tests: blocks of 8 tokens, an exact (float32) cache of `tokens` slots."""

from __future__ import annotations

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token


def engine_for(model, tokens: int, **config) -> GuardEngine:
    budget = tokens * bytes_per_token(model.config, model.dtype)
    return GuardEngine(
        model, EngineConfig(block_size=8, kv_cache_bytes=budget, kv_cache_dtype="float32", **config)
    )
