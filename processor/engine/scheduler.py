"""Who runs in the next step: conversations with waiting tokens, under a token and a conversation budget.

Blocks come from the block manager; when they run short the least recently used idle conversation
is evicted (its cache is dropped; the caller rebuilds it from history when it comes back). No tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from processor.engine.block_manager import BlockManager
from processor.engine.sequence import ChunkRequest, Conversation


# Not frozen, and its derived fields computed once: one is built per conversation per step, and read
# several times by the runner and the engine (a frozen dataclass's __init__ sets each field through
# object.__setattr__).
@dataclass(slots=True)
class ScheduledChunk:
    """`length` tokens of `request`, from its index `offset`, run in this step."""

    conversation: Conversation
    request: ChunkRequest
    offset: int
    length: int
    start_position: int = field(init=False)
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.start_position = self.request.start_position + self.offset
        self.token_ids = self.request.token_ids[self.offset : self.offset + self.length]


@dataclass
class Schedule:
    chunks: list[ScheduledChunk]
    # Requests that can never fit: their conversation needs more blocks than the whole cache has.
    too_large: list[ChunkRequest]


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_tokens: int,
        max_batch_conversations: int,
        evict: Callable[[Conversation], None],
    ) -> None:
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_conversations = max_batch_conversations
        self._evict = evict

    def schedule(
        self, waiting_conversations: dict[str, Conversation], idle_conversations: dict[str, Conversation]
    ) -> Schedule:
        """`waiting_conversations`: the held conversations with work queued; `idle_conversations`: the
        others, least recently used first, which eviction takes in that order (`evict` forgets one)."""
        waiting = sorted(
            waiting_conversations.values(),
            key=lambda conversation: conversation.pending[0].request_id,  # oldest request first
        )
        chunks: list[ScheduledChunk] = []
        too_large: list[ChunkRequest] = []
        token_budget = self.max_batch_tokens
        for conversation in waiting:
            if token_budget == 0 or len(chunks) == self.max_batch_conversations:
                break
            request = conversation.pending[0]
            if (
                self.blocks.blocks_for(request.start_position + len(request.token_ids))
                > self.blocks.num_blocks
            ):
                too_large.append(request)
                continue
            length = min(request.remaining, token_budget)
            end_position = request.start_position + request.done + length
            if not self._make_room(idle_conversations, conversation, end_position):
                continue
            self.blocks.grow(conversation.block_table, end_position)
            chunks.append(ScheduledChunk(conversation, request, request.done, length))
            token_budget -= length
        # Every waiting conversation blocked by the caches of other waiting ones: take the oldest
        # one's room from the others (they rebuild from their own cached tokens later).
        if not chunks and not too_large and waiting and self._preempt_for(waiting[0], waiting[1:]):
            return self.schedule(waiting_conversations, idle_conversations)
        return Schedule(chunks, too_large)

    def _make_room(
        self, idle: dict[str, Conversation], conversation: Conversation, end_position: int
    ) -> bool:
        needed = self.blocks.extra_blocks_needed(conversation.block_table, end_position)
        # The least recently used idle conversation first: `idle` is in that order, so no step sorts
        # (or walks) the conversations a full cache holds, and `evict` takes the victim out of it.
        while needed > self.blocks.free_blocks and idle:
            self._evict(next(iter(idle.values())))
        return needed <= self.blocks.free_blocks

    def _preempt_for(self, first: Conversation, others: list[Conversation]) -> bool:
        """Free other waiting conversations' blocks until `first` fits; False if nothing was freed."""
        freed = False
        for other in sorted(others, key=lambda other: -len(other.block_table)):
            if not other.block_table:
                continue
            request = other.pending[0]
            if request.done:
                # Part of this request is already cached: fold it back so the whole request reruns.
                request.clear_results()
                request.done = 0
            kept = other.cached_token_ids[: request.start_position]
            request.token_ids = kept + request.token_ids
            request.rebuild += len(kept)
            request.start_position = 0
            other.cached_token_ids = []
            self.blocks.release(other.block_table)
            freed = True
            needed = self.blocks.extra_blocks_needed(
                first.block_table, first.pending[0].start_position + len(first.pending[0].token_ids)
            )
            if needed <= self.blocks.free_blocks:
                break
        return freed
