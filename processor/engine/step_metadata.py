"""A step's integers as columns over its conversations: built once from the schedule, read by every
attention backend and by the CUDA-graph buffers.

A step runs hundreds of conversations, so nothing here loops over them in Python except to copy each
block table once (a memory copy: tables are int64 arrays). Positions and slots come from torch ops
over the columns.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepMetadata:
    """Conversation after conversation in the schedule's order, as int64 host tensors. T: the step's
    new tokens, C: its conversations, W: the widest block table."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot where each new token's key and value go
    lengths: torch.Tensor  # [C] new tokens of each conversation
    start_positions: torch.Tensor  # [C] the position of each conversation's first new token
    query_starts: torch.Tensor  # [C + 1] first packed row of each conversation's tokens, then T
    seq_lens: torch.Tensor  # [C] keys of each conversation after the step (cached and new)
    block_tables: torch.Tensor  # [C, W] the blocks each conversation's keys fill, then block 0
    max_length: int  # the longest conversation's new tokens
    max_seq_len: int  # the longest conversation's keys


def long_tensor(values: Sequence[int]) -> torch.Tensor:
    """An int64 CPU tensor of `values`. Through an array: torch.tensor reads a list one Python int at
    a time, and a step builds thousands of entries."""
    if not values:
        return torch.empty(0, dtype=torch.long)  # frombuffer refuses an empty buffer
    return torch.frombuffer(values if isinstance(values, array) else array("q", values), dtype=torch.long)


def padded_tables(
    block_tables: Sequence[array], seq_lens: Sequence[int], block_size: int
) -> tuple[array, int]:
    """The blocks each of `seq_lens` keys fill, from each of `block_tables` (int64 arrays, each at
    least that long), padded with block 0 to the widest: a [C, W] matrix, flat, and its width W."""
    widths = [-(-keys // block_size) for keys in seq_lens]
    width = max(widths, default=0)
    padding = array("q", bytes(8 * width))
    flat = array("q")
    for table, blocks in zip(block_tables, widths, strict=True):
        flat += table[:blocks]
        flat += padding[blocks:]
    return flat, width


def step_metadata(
    token_ids: Sequence[int],
    start_positions: Sequence[int],
    lengths: Sequence[int],
    block_tables: Sequence[array],
    block_size: int,
) -> StepMetadata:
    """The columns of a step that runs, of each conversation, `lengths` new tokens from
    `start_positions`, whose keys sit in `block_tables` (`token_ids` packed in the same order)."""
    count, tokens, max_length = len(lengths), len(token_ids), max(lengths, default=0)
    seq_lens = [start + length for start, length in zip(start_positions, lengths, strict=True)]
    flat, width = padded_tables(block_tables, seq_lens, block_size)
    tables = long_tensor(flat).view(count, width)
    lengths_column, starts_column = long_tensor(lengths), long_tensor(start_positions)
    if max_length == 1 and tokens == count:
        # The streaming step: one new token a conversation, at its start position. Its slots take one
        # Python expression a conversation, which at a step's few hundred conversations costs less
        # than the general case's torch operations (each a dispatch through torch's operator stack).
        positions, query_starts = starts_column, torch.arange(count + 1)
        slots = long_tensor(
            [
                table[position // block_size] * block_size + position % block_size
                for table, position in zip(block_tables, start_positions, strict=True)
            ]
        )
    else:
        query_starts = torch.zeros(count + 1, dtype=torch.long)
        torch.cumsum(lengths_column, 0, out=query_starts[1:])
        owners = torch.repeat_interleave(torch.arange(count), lengths_column, output_size=tokens)
        positions = starts_column[owners] + torch.arange(tokens) - query_starts[owners]
        slots = tables[owners, positions // block_size] * block_size + positions % block_size
    return StepMetadata(
        token_ids=long_tensor(token_ids),
        positions=positions,
        slots=slots,
        lengths=lengths_column,
        start_positions=starts_column,
        query_starts=query_starts,
        seq_lens=long_tensor(seq_lens),
        block_tables=tables,
        max_length=max_length,
        max_seq_len=max(seq_lens, default=0),
    )
