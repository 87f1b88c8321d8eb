"""The paged-cache reads of the attention module, against plain indexing of the same cache."""

from __future__ import annotations

import torch

from processor.model.attention import GatherScratch, read_kv, read_kv_blocks

KV_HEADS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 10, 4, 5


def random_layer() -> torch.Tensor:
    """[2 (key, value), kv_heads, slots, head_dim], every element distinct."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, KV_HEADS, BLOCKS * BLOCK_SIZE, HEAD_DIM, generator=generator)


def test_read_kv_blocks_gives_each_rows_blocks_in_table_order():
    layer = random_layer()
    tables = torch.tensor([[7, 2, 9], [0, 0, 0], [3, 8, 1]])
    keys, values = read_kv_blocks(layer, tables, BLOCK_SIZE, GatherScratch(), torch.float32)
    assert keys.shape == (KV_HEADS, 3, 3 * BLOCK_SIZE, HEAD_DIM)
    for row, table in enumerate(tables.tolist()):
        slots = [block * BLOCK_SIZE + offset for block in table for offset in range(BLOCK_SIZE)]
        assert torch.equal(keys[:, row], layer[0][:, slots])
        assert torch.equal(values[:, row], layer[1][:, slots])


def test_read_kv_gives_the_slots_in_order():
    layer = random_layer()
    slots = torch.tensor([5, 0, 39, 5, 17])
    keys, values = read_kv(layer, slots, GatherScratch(), torch.float64)
    assert keys.dtype == torch.float64
    assert torch.equal(keys, layer[0][:, slots.tolist()].double())
    assert torch.equal(values, layer[1][:, slots.tolist()].double())


def test_scratch_reuses_its_buffer_until_a_larger_or_different_one_is_asked_for():
    scratch, like = GatherScratch(), torch.empty(0)
    large = scratch.take("keys", (4, 100), like)
    smaller = scratch.take("keys", (3, 7), like)
    assert smaller.shape == (3, 7)
    assert smaller.data_ptr() == large.data_ptr()
    assert scratch.take("values", (3, 7), like).data_ptr() != large.data_ptr()  # one buffer per name
    assert scratch.take("keys", (5, 100), like).numel() == 500  # grown
    other_dtype = scratch.take("keys", (2, 2), torch.empty(0, dtype=torch.float64))
    assert other_dtype.dtype == torch.float64


def test_reads_do_not_depend_on_what_the_scratch_held_before():
    layer, scratch = random_layer(), GatherScratch()
    read_kv_blocks(layer, torch.tensor([[1, 2, 3, 4]] * 5), BLOCK_SIZE, scratch, torch.float32)
    tables = torch.tensor([[6], [4]])
    keys, _ = read_kv_blocks(layer, tables, BLOCK_SIZE, scratch, torch.float32)
    fresh, _ = read_kv_blocks(layer, tables, BLOCK_SIZE, GatherScratch(), torch.float32)
    assert torch.equal(keys, fresh)
