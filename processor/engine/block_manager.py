"""Bookkeeping of the paged KV cache's fixed-size blocks: which are free, which a conversation owns.

Pure Python on purpose: no tensors here, so it can be unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import MutableSequence

# A conversation's blocks in order: a list, or (the engine's) an int64 array.
BlockTable = MutableSequence[int]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO reuse keeps recently freed (cache-warm) blocks in use first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, block_table: BlockTable, num_tokens: int) -> int:
        """Blocks to add to `block_table` so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def grow(self, block_table: BlockTable, num_tokens: int) -> None:
        """Extend `block_table` in place to hold `num_tokens` tokens; the caller checked there is room."""
        needed = self.extra_blocks_needed(block_table, num_tokens)
        if needed > len(self._free):
            raise MemoryError(f"need {needed} KV blocks, {len(self._free)} free")
        for _ in range(needed):
            block_table.append(self._free.pop())

    def shrink(self, block_table: BlockTable, num_tokens: int) -> None:
        """Give back the blocks past what `num_tokens` tokens need."""
        keep = self.blocks_for(num_tokens)
        while len(block_table) > keep:
            self._free.append(block_table.pop())

    def release(self, block_table: BlockTable) -> None:
        self.shrink(block_table, 0)

    def slots(self, block_table: BlockTable, start: int, end: int) -> list[int]:
        """Flat cache slots of token positions start..end-1, one position at a time (a step computes its
        slots as columns: step_metadata.step_metadata)."""
        size = self.block_size
        return [block_table[position // size] * size + position % size for position in range(start, end)]
