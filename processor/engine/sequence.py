"""One conversation as the engine sees it: the tokens held in the KV cache and the work waiting."""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field

# Per-token label columns: argmax class index and its probability for each of the four heads.
LABEL_COLUMNS = (
    "risk_level",
    "risk_prob",
    "category",
    "category_prob",
    "query_risk_level",
    "query_risk_prob",
    "query_category",
    "query_category_prob",
)


@dataclass(slots=True)
class ChunkRequest:
    """Tokens to run for one caller request.

    `token_ids` may start with `rebuild` tokens the conversation already had before it lost its cache
    (evicted, or new to this engine): they are run to refill the cache, their results are dropped.
    """

    request_id: int
    conversation_id: str
    token_ids: list[int]
    start_position: int
    rebuild: int = 0
    done: int = 0
    # Per-token labels as columns (LABEL_COLUMNS order): class indexes are ints, probabilities floats,
    # so results are handed out without converting each token. None until the request's first rows
    # run: most requests run whole in one step, and their columns are then that step's slices.
    label_columns: list[list] | None = None
    probabilities: dict[str, list[list[float]]] = field(default_factory=dict)  # head -> per-token rows

    def clear_results(self) -> None:
        self.label_columns = None
        self.probabilities.clear()

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    @property
    def new_token_ids(self) -> list[int]:
        return self.token_ids[self.rebuild :]


@dataclass
class Conversation:
    conversation_id: str
    # Token ids whose keys and values are in the cache, in order (position = index).
    cached_token_ids: list[int] = field(default_factory=list)
    # int64, so that a step copies each table into its metadata whole (step_metadata.padded_tables).
    block_table: array = field(default_factory=lambda: array("q"))
    pending: deque[ChunkRequest] = field(default_factory=deque)

    @property
    def num_cached(self) -> int:
        return len(self.cached_token_ids)

    @property
    def next_position(self) -> int:
        """Where the next submitted token will sit, counting tokens queued but not yet run."""
        if self.pending:
            last = self.pending[-1]
            return last.start_position + len(last.token_ids)
        return self.num_cached

    @property
    def is_idle(self) -> bool:
        return not self.pending
