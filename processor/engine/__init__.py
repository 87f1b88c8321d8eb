"""The batched streaming engine: conversations, KV blocks, scheduler, model runner, asyncio front."""

from processor.engine.async_engine import AsyncGuardEngine, HistoryUnavailableError, TokenHistory
from processor.engine.engine import EngineConfig, EngineStats, GuardEngine
from processor.engine.results import ChunkResult, ChunkStatus, HeadLabels

__all__ = [
    "AsyncGuardEngine",
    "ChunkResult",
    "ChunkStatus",
    "EngineConfig",
    "EngineStats",
    "GuardEngine",
    "HeadLabels",
    "HistoryUnavailableError",
    "TokenHistory",
]
