import pytest

from processor.engine.block_manager import BlockManager


def test_grow_shrink_release_account_for_every_block():
    blocks = BlockManager(num_blocks=4, block_size=16)
    table: list[int] = []
    blocks.grow(table, 17)
    assert len(table) == 2 and blocks.free_blocks == 2
    blocks.grow(table, 32)
    assert len(table) == 2, "32 tokens still fit in two blocks"
    blocks.shrink(table, 5)
    assert len(table) == 1 and blocks.free_blocks == 3
    blocks.release(table)
    assert table == [] and blocks.free_blocks == 4


def test_slots_are_distinct_across_conversations():
    blocks = BlockManager(num_blocks=6, block_size=4)
    first: list[int] = []
    second: list[int] = []
    blocks.grow(first, 10)
    blocks.grow(second, 9)
    slots = blocks.slots(first, 0, 10) + blocks.slots(second, 0, 9)
    assert len(set(slots)) == len(slots)
    assert all(0 <= slot < blocks.capacity_tokens for slot in slots)
    # A position's slot is its block's first slot plus its offset in the block, whatever range asks.
    assert blocks.slots(first, 5, 7) == slots[5:7]
    assert slots[:4] == [first[0] * 4 + offset for offset in range(4)]
    assert blocks.slots(first, 3, 3) == []


def test_growing_past_free_blocks_fails_loudly():
    blocks = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(MemoryError, match="need 3 KV blocks, 2 free"):
        blocks.grow([], 12)
