"""Drop-in for the hub's streaming API: change `from transformers import AutoModel` to
`from processor.compat import AutoModel` and the quickstart runs on our engine.

Unlike the hub's code, a call may carry any number of tokens and the history is never re-run: each
stream is a conversation in the engine's KV cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from processor.engine import ChunkStatus, EngineConfig, GuardEngine
from processor.model.loader import GuardModel, load_guard_model
from processor.score import verdicts_for


@dataclass
class StreamState:
    """What the hub calls `stream_state`: one conversation's id and its results so far."""

    conversation_id: str
    result: dict[str, list[Any]] = field(
        default_factory=lambda: {"risk_level": [], "risk_prob": [], "category": [], "category_prob": []}
    )


class StreamGuardModel:
    """The hub model's streaming methods, backed by a `GuardEngine`."""

    def __init__(self, model: GuardModel, engine_config: EngineConfig | None = None) -> None:
        self.model = model
        self.engine = GuardEngine(model, engine_config)
        self._stream_ids = itertools.count()

    def eval(self) -> StreamGuardModel:  # the quickstart calls .eval(); inference-only already
        return self

    def stream_moderate_from_ids(
        self, token_ids: Sequence[int] | torch.Tensor, role: str, stream_state: StreamState | None = None
    ) -> tuple[dict[str, list[Any]], StreamState]:
        """Moderate the next token(s) of a stream; returns lists over every position so far."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        elif isinstance(token_ids, int):
            token_ids = [token_ids]
        if role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
        state = stream_state or StreamState(conversation_id=f"stream-{next(self._stream_ids)}")
        self.engine.submit(state.conversation_id, list(token_ids))
        for result in self.engine.run_until_idle():
            if result.status is not ChunkStatus.OK:
                raise ValueError(f"stream {state.conversation_id}: {result.status.value}")
            for verdict in verdicts_for(self.model, result, [role] * len(result.token_ids)):
                state.result["risk_level"].append(verdict.risk_level)
                state.result["risk_prob"].append(verdict.risk_prob)
                state.result["category"].append(verdict.category)
                state.result["category_prob"].append(verdict.category_prob)
        return state.result, state

    def close_stream(self, stream_state: StreamState | None) -> None:
        if stream_state is not None:
            self.engine.release(stream_state.conversation_id)


class AutoModel:
    """`AutoModel.from_pretrained(...)` as the hub quickstart calls it (remote-code flags ignored)."""

    @staticmethod
    def from_pretrained(
        model: str | Path,
        device_map: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **_ignored: Any,
    ) -> StreamGuardModel:
        device = None if device_map in (None, "auto") else device_map
        dtype = None if torch_dtype in (None, "auto") else torch_dtype
        return StreamGuardModel(load_guard_model(model, device=device, dtype=dtype))
