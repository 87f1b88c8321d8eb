"""Scheduler decisions: budgets, FIFO order, LRU eviction of idle conversations (no tensors)."""

from processor.engine.block_manager import BlockManager
from processor.engine.scheduler import Scheduler
from processor.engine.sequence import ChunkRequest, Conversation


def conversation_with(conversation_id: str, request_id: int, tokens: int, cached: int = 0) -> Conversation:
    conversation = Conversation(conversation_id, cached_token_ids=[1] * cached)
    if tokens:
        conversation.pending.append(
            ChunkRequest(request_id, conversation_id, [2] * tokens, start_position=cached)
        )
    return conversation


class Held:
    """The conversations an engine holds, and what it keeps beside them for the scheduler: the waiting
    ones, and the idle ones least recently used first (here: in the order they were added)."""

    def __init__(self, blocks: BlockManager, tokens: int = 100, conversations: int = 10) -> None:
        self.conversations: dict[str, Conversation] = {}
        self.idle: dict[str, Conversation] = {}
        self.evicted: list[str] = []
        self.scheduler = Scheduler(blocks, tokens, conversations, self._evict)
        self._blocks = blocks

    def add(self, conversation: Conversation) -> None:
        self.conversations[conversation.conversation_id] = conversation
        if not conversation.pending:
            self.idle[conversation.conversation_id] = conversation

    def schedule(self):
        waiting = {name: c for name, c in self.conversations.items() if c.pending}
        return self.scheduler.schedule(waiting, self.idle)

    def _evict(self, conversation: Conversation) -> None:
        self._blocks.release(conversation.block_table)
        self.evicted.append(conversation.conversation_id)
        del self.conversations[conversation.conversation_id], self.idle[conversation.conversation_id]


def test_token_budget_splits_a_long_prompt_and_keeps_fifo_order():
    held = Held(BlockManager(64, 4), tokens=10)
    held.add(conversation_with("late", request_id=2, tokens=1))
    held.add(conversation_with("early", request_id=1, tokens=25))
    schedule = held.schedule()
    assert [c.conversation_id for c in schedule.conversations] == ["early"] and schedule.lengths == [10]
    assert schedule.offsets == [0] and schedule.start_positions == [0] and schedule.token_ids == [2] * 10


def test_conversation_budget_caps_the_batch():
    held = Held(BlockManager(64, 4), conversations=3)
    for index in range(5):
        held.add(conversation_with(f"c{index}", index, tokens=1))
    assert len(held.schedule().conversations) == 3


def test_least_recently_used_idle_conversation_is_evicted_when_blocks_run_out():
    blocks = BlockManager(4, 4)
    held = Held(blocks)
    for name in ("old", "recent"):  # used in this order
        conversation = conversation_with(name, 0, tokens=0, cached=8)
        blocks.grow(conversation.block_table, 8)
        held.add(conversation)
    held.add(conversation_with("new", 9, tokens=5))
    schedule = held.schedule()
    assert held.evicted == ["old"] and list(held.idle) == ["recent"]
    assert [conversation.conversation_id for conversation in schedule.conversations] == ["new"]


def test_request_larger_than_the_whole_cache_is_reported_not_scheduled():
    held = Held(BlockManager(2, 4))
    held.add(conversation_with("huge", 0, tokens=9))
    schedule = held.schedule()
    assert schedule.conversations == [] and [request.conversation_id for request in schedule.too_large] == [
        "huge"
    ]


def test_a_split_request_goes_on_from_where_its_last_step_ended():
    held = Held(BlockManager(64, 4), tokens=10)
    conversation = conversation_with("long", request_id=1, tokens=0, cached=3)
    conversation.pending.append(ChunkRequest(1, "long", list(range(25)), start_position=3, done=10))
    held.add(conversation)
    schedule = held.schedule()
    assert schedule.offsets == [10] and schedule.lengths == [10] and schedule.start_positions == [13]
    assert schedule.token_ids == list(range(10, 20)) and schedule.tokens == 10
    assert len(conversation.block_table) == 6, "blocks for the 23 tokens cached after the step"
