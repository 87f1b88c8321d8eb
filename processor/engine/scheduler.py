"""Who runs in the next step: conversations with waiting tokens, under a token and a conversation budget.

Blocks come from the block manager; when they run short the least recently used idle conversation
is evicted (its cache is dropped; the caller rebuilds it from history when it comes back). No tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from processor.engine.block_manager import BlockManager
from processor.engine.sequence import ChunkRequest, Conversation


@dataclass(slots=True)
class Schedule:
    """Who runs in the step, as columns over its conversations, from which the model runner builds the
    step's tensors whole: conversation i runs `lengths[i]` tokens of `requests[i]`, its first queued
    request, from the request's index `offsets[i]`, at positions from `start_positions[i]`.
    `token_ids` holds every conversation's tokens, packed in that order."""

    conversations: list[Conversation] = field(default_factory=list)
    requests: list[ChunkRequest] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    # Requests that can never fit: their conversation needs more blocks than the whole cache has.
    too_large: list[ChunkRequest] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


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
        schedule = Schedule()
        conversations, requests, lengths = schedule.conversations, schedule.requests, schedule.lengths
        token_ids = schedule.token_ids
        token_budget = self.max_batch_tokens
        block_size, num_blocks = self.blocks.block_size, self.blocks.num_blocks
        for conversation in waiting:
            if token_budget == 0 or len(conversations) == self.max_batch_conversations:
                break
            request = conversation.pending[0]
            request_tokens = request.token_ids
            if -(-(request.start_position + len(request_tokens)) // block_size) > num_blocks:
                schedule.too_large.append(request)
                continue
            done = request.done
            length = min(len(request_tokens) - done, token_budget)
            start_position = request.start_position + done
            end_position = start_position + length
            # Most steps add no block: a conversation's table grows once every block_size tokens.
            if -(-end_position // block_size) > len(conversation.block_table):
                if not self._make_room(idle_conversations, conversation, end_position):
                    continue
                self.blocks.grow(conversation.block_table, end_position)
            conversations.append(conversation)
            requests.append(request)
            schedule.offsets.append(done)
            lengths.append(length)
            schedule.start_positions.append(start_position)
            if length == len(request_tokens):
                token_ids += request_tokens
            else:
                token_ids += request_tokens[done : done + length]
            token_budget -= length
        # Every waiting conversation blocked by the caches of other waiting ones: take the oldest
        # one's room from the others (they rebuild from their own cached tokens later).
        if (
            not conversations
            and not schedule.too_large
            and waiting
            and self._preempt_for(waiting[0], waiting[1:])
        ):
            return self.schedule(waiting_conversations, idle_conversations)
        return schedule

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
