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


def make_scheduler(blocks: BlockManager, tokens: int = 100, conversations: int = 10):
    evicted: list[str] = []

    def evict(conversation: Conversation) -> None:
        blocks.release(conversation.block_table)
        evicted.append(conversation.conversation_id)
        del held[conversation.conversation_id]

    held: dict[str, Conversation] = {}
    return Scheduler(blocks, tokens, conversations, evict), held, evicted


def test_token_budget_splits_a_long_prompt_and_keeps_fifo_order():
    blocks = BlockManager(64, 4)
    scheduler, held, _ = make_scheduler(blocks, tokens=10)
    held["late"] = conversation_with("late", request_id=2, tokens=1)
    held["early"] = conversation_with("early", request_id=1, tokens=25)
    chunks = scheduler.schedule(held, step=1).chunks
    assert [(chunk.conversation.conversation_id, chunk.length) for chunk in chunks] == [("early", 10)]


def test_conversation_budget_caps_the_batch():
    blocks = BlockManager(64, 4)
    scheduler, held, _ = make_scheduler(blocks, conversations=3)
    for index in range(5):
        held[f"c{index}"] = conversation_with(f"c{index}", index, tokens=1)
    assert len(scheduler.schedule(held, step=1).chunks) == 3


def test_least_recently_used_idle_conversation_is_evicted_when_blocks_run_out():
    blocks = BlockManager(4, 4)
    scheduler, held, evicted = make_scheduler(blocks)
    for name, last_used in (("old", 1), ("recent", 5)):
        conversation = conversation_with(name, 0, tokens=0, cached=8)
        blocks.grow(conversation.block_table, 8)
        conversation.last_used_step = last_used
        held[name] = conversation
    held["new"] = conversation_with("new", 9, tokens=5)
    chunks = scheduler.schedule(held, step=6).chunks
    assert evicted == ["old"]
    assert [chunk.conversation.conversation_id for chunk in chunks] == ["new"]


def test_request_larger_than_the_whole_cache_is_reported_not_scheduled():
    blocks = BlockManager(2, 4)
    scheduler, held, _ = make_scheduler(blocks)
    held["huge"] = conversation_with("huge", 0, tokens=9)
    schedule = scheduler.schedule(held, step=1)
    assert schedule.chunks == [] and [request.conversation_id for request in schedule.too_large] == ["huge"]
