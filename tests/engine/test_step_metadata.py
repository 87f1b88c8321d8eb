"""A step's metadata built as columns equals the same metadata built one conversation at a time, on
random ragged steps; and so do the attention backends' inputs the model runner derives from it."""

from __future__ import annotations

import random
from array import array
from itertools import accumulate

import pytest
import torch

from processor.engine.block_manager import BlockManager
from processor.engine.model_runner import ModelRunner
from processor.engine.step_metadata import padded_tables, step_metadata
from processor.model.attention import GatherScratch, paged_tables

BLOCK_SIZE = 4


def random_step(rng: random.Random, blocks: BlockManager, streaming: bool = False):
    """Conversations with cached keys and new tokens (one each when `streaming`), each with a block
    table grown to hold them, some grown past (a table may hold more blocks than a step reads)."""
    count = rng.randint(1, 12)
    start_positions = [rng.choice([0, 1, 3, 4, 7, 15, 30]) for _ in range(count)]
    lengths = [1 if streaming else rng.choice([1, 1, 2, 5, 9]) for _ in range(count)]
    tables = []
    for start, length in zip(start_positions, lengths, strict=True):
        table = array("q")
        blocks.grow(table, start + length + rng.choice([0, 0, BLOCK_SIZE]))
        tables.append(table)
    token_ids = [rng.randrange(1000) for _ in range(sum(lengths))]
    return token_ids, start_positions, lengths, tables


def one_at_a_time(token_ids, start_positions, lengths, tables, blocks: BlockManager) -> dict:
    """The step's columns, conversation by conversation, position by position."""
    positions, slots, seq_lens, rows = [], [], [], []
    for start, length, table in zip(start_positions, lengths, tables, strict=True):
        positions += range(start, start + length)
        slots += blocks.slots(table, start, start + length)
        seq_lens.append(start + length)
        rows.append(list(table[: blocks.blocks_for(start + length)]))
    width = max(map(len, rows))
    return {
        "token_ids": token_ids,
        "positions": positions,
        "slots": slots,
        "lengths": lengths,
        "query_starts": [0, *accumulate(lengths)],
        "seq_lens": seq_lens,
        "block_tables": [row + [0] * (width - len(row)) for row in rows],
    }


@pytest.mark.parametrize("streaming", [False, True])
def test_columns_equal_the_per_conversation_construction(streaming):
    rng = random.Random(3)
    for _ in range(200):
        blocks = BlockManager(num_blocks=400, block_size=BLOCK_SIZE)
        step = random_step(rng, blocks, streaming)
        columns = step_metadata(*step, BLOCK_SIZE)
        expected = one_at_a_time(*step, blocks)
        for name, values in expected.items():
            column = getattr(columns, name)
            assert column.dtype == torch.long and column.tolist() == values, name
        assert columns.max_length == max(step[2]) and columns.max_seq_len == max(expected["seq_lens"])
        assert columns.start_positions.tolist() == step[1]


def test_an_empty_step_has_empty_columns():
    columns = step_metadata([], [], [], [], BLOCK_SIZE)
    assert columns.token_ids.numel() == columns.slots.numel() == columns.lengths.numel() == 0
    assert columns.query_starts.tolist() == [0] and columns.block_tables.shape == (0, 0)


def test_tables_are_cut_to_the_blocks_their_keys_fill_and_padded_with_block_zero():
    flat, width = padded_tables([array("q", [7, 8, 9]), array("q", [5])], [5, 3], block_size=4)
    assert width == 2 and flat.tolist() == [7, 8, 5, 0]


class Runner(ModelRunner):
    """The model runner's metadata builders, without a model."""

    def __init__(self, blocks: BlockManager, powers_of_two: bool) -> None:
        self.blocks = blocks
        self.device = torch.device("cpu")
        self.scratch = GatherScratch()
        self.query_classes_by_powers_of_two = powers_of_two
        self.model = type("Model", (), {"dtype": torch.float32})()


def test_the_kernels_tables_equal_the_per_conversation_construction():
    rng = random.Random(4)
    for _ in range(100):
        blocks = BlockManager(num_blocks=400, block_size=BLOCK_SIZE)
        token_ids, start_positions, lengths, tables = random_step(rng, blocks)
        step = step_metadata(token_ids, start_positions, lengths, tables, BLOCK_SIZE)
        runner = Runner(blocks, powers_of_two=True)
        seq_lens = [start + length for start, length in zip(start_positions, lengths, strict=True)]
        cut = [list(table[: blocks.blocks_for(keys)]) for table, keys in zip(tables, seq_lens, strict=True)]

        expected = paged_tables(lengths, seq_lens, cut, torch.device("cpu"))  # the Triton kernel's
        actual = runner._paged_tables(step)
        for name in ("query_starts", "seq_lens", "block_tables"):
            assert torch.equal(getattr(actual, name), getattr(expected, name)), name

        paged = runner._paged_chunks(step)  # the C kernel's: a chunk's table starts at its offset
        assert paged.chunks[:, :3].tolist() == [
            [end - length, start, length]
            for end, start, length in zip(accumulate(lengths), start_positions, lengths, strict=True)
        ]
        for row, table in zip(paged.chunks.tolist(), cut, strict=True):
            offset = row[3]
            assert paged.tables[offset : offset + len(table)].tolist() == table
        assert paged.max_length == max(lengths) and paged.max_context == max(seq_lens)


@pytest.mark.parametrize("powers_of_two", [True, False])
def test_attention_groups_equal_the_per_conversation_construction(powers_of_two):
    """Each sdpa group's rows, positions, tables and mask, against the same group written out one
    conversation at a time."""
    rng = random.Random(5)
    for _ in range(60):
        blocks = BlockManager(num_blocks=400, block_size=BLOCK_SIZE)
        token_ids, start_positions, lengths, tables = random_step(rng, blocks)
        step = step_metadata(token_ids, start_positions, lengths, tables, BLOCK_SIZE)
        first_rows = list(accumulate(lengths, initial=0))
        groups = Runner(blocks, powers_of_two)._attention_groups(step, lengths)
        seen = []
        for group in groups:
            count, queries = group.token_rows.shape
            width = group.block_tables.shape[1]
            members = [first_rows.index(row) for row in group.token_rows[:, 0].tolist()]
            seen += members
            assert queries == max(lengths[i] for i in members)
            assert width == max(blocks.blocks_for(start_positions[i] + lengths[i]) for i in members)
            flat, tokens, mask = [], [], torch.full((count, queries, width * BLOCK_SIZE), float("-inf"))
            for place, index in enumerate(members):
                start, length = start_positions[index], lengths[index]
                table = list(tables[index][: blocks.blocks_for(start + length)])
                assert group.block_tables[place].tolist() == table + [0] * (width - len(table))
                rows = list(range(first_rows[index], first_rows[index] + length))
                assert group.token_rows[place].tolist() == rows + [0] * (queries - length)
                flat += range(place * queries, place * queries + length)
                tokens += rows
                for query in range(queries):
                    position = start + query if query < length else 0
                    mask[place, query, : position + 1] = 0
            assert group.valid_flat.tolist() == flat and group.valid_tokens.tolist() == tokens
            assert torch.equal(group.mask[0], mask)
        assert sorted(seen) == list(range(len(lengths)))


def test_columns_go_to_a_device_in_one_copy_and_come_out_whole():
    runner = Runner(BlockManager(num_blocks=4, block_size=BLOCK_SIZE), powers_of_two=True)
    columns = torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])
    on_cpu = runner._to_device(*columns, dtype=torch.int32)
    assert [c.tolist() for c in on_cpu] == [[1, 2, 3], [4], [5, 6]] and on_cpu[0].dtype == torch.int32
    runner.device = torch.device("meta")  # any device but the CPU takes the packed path
    on_device = runner._to_device(*columns)
    assert [tuple(c.shape) for c in on_device] == [(3,), (1,), (2,)]
    assert all(c.device.type == "meta" and c.dtype == torch.long for c in on_device)
