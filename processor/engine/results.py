"""What the engine hands back for a chunk of one conversation's tokens (host-side, plain lists)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ChunkStatus(StrEnum):
    OK = "ok"
    # The chunk would pass the model's max_position_embeddings: nothing was run, the caller decides.
    CONTEXT_EXCEEDED = "context_exceeded"
    # The conversation needs more KV blocks than the whole cache has: give the engine more memory.
    EXCEEDS_CACHE = "exceeds_cache"


# Not frozen: two labels and a result are built per conversation per step, and a frozen dataclass's
# __init__ sets each field through object.__setattr__. Nothing changes them once handed out.
@dataclass(slots=True)
class HeadLabels:
    """Argmax class index and its softmax probability per token, for one head pair."""

    risk_level: list[int]
    risk_prob: list[float]
    category: list[int]
    category_prob: list[float]


@dataclass(slots=True)
class ChunkResult:
    """Per-token labels for `token_ids`, which sit at positions start_position.. of the conversation."""

    conversation_id: str
    request_id: int
    start_position: int
    token_ids: list[int]
    response: HeadLabels
    query: HeadLabels
    status: ChunkStatus = ChunkStatus.OK
    # Head name -> per-token class probabilities, only when the engine was asked to keep them.
    probabilities: dict[str, list[list[float]]] | None = None

    def heads_for_role(self, role: str) -> HeadLabels:
        """User turns read the query heads, assistant turns the response heads (model fact)."""
        return self.query if role == "user" else self.response
