"""Turns a scheduled batch into tensors, runs one forward pass, and returns the labels on the host.

Per-step metadata (positions, cache slots, attention groups) is built here once and handed to every
layer; labels and probabilities are computed on the device and copied to the host in one transfer.
With CUDA graphs on (`cuda_graphs.GraphRunner`), a step that fits a captured bucket replays its graph;
any other step runs eagerly here, through the same attention kernel.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from processor.engine.block_manager import BlockManager
from processor.engine.cuda_graphs import GraphRunner, StepMetadata
from processor.engine.scheduler import ScheduledChunk
from processor.model.attention import (
    AttentionBackend,
    AttentionBatch,
    AttentionGroup,
    GatherScratch,
    PackedKeys,
    PagedChunks,
    PagedTables,
    flex_packed_attention,
    packed_keys,
    paged_cpu_attention,
    paged_tables,
    triton_paged_attention,
)
from processor.model.cpu_kernel import split_by_work
from processor.model.loader import GuardModel
from processor.model.qwen3_guard import HEAD_NAMES, LABEL_MATRIX_COLUMNS

# A group's widest member may read at most this many times the key blocks of its narrowest...
KEY_LENGTH_SPREAD = 2
# ...unless the whole group is this narrow: below it, padding costs less than another group's ops.
KEY_BLOCKS_UNSPLIT = 8


@dataclass
class StepOutput:
    # [sequence.LABEL_COLUMNS][tokens], tokens in the scheduled chunks' order; index columns hold ints.
    label_columns: list[list]
    probabilities: dict[str, list[list[float]]] | None  # head -> [tokens][classes], when asked for


def long_tensor(values: list[int]) -> torch.Tensor:
    """An int64 CPU tensor of `values`. Through an array: torch.tensor reads a list one Python int at
    a time, and a step builds thousands of block-table entries."""
    if not values:
        return torch.empty(0, dtype=torch.long)  # frombuffer refuses an empty buffer
    return torch.frombuffer(array("q", values), dtype=torch.long)


def step_output(matrix: torch.Tensor, head_sizes: list[int] | None) -> StepOutput:
    """A step's results from its label matrix on the host (GuardLogits.label_matrix): the label
    columns, and each head's probabilities where the matrix carries them (`head_sizes` classes each)."""
    labels = matrix[:, :LABEL_MATRIX_COLUMNS]
    indexes, probs = labels[:, 0::2].long().T.tolist(), labels[:, 1::2].T.tolist()
    label_columns = [column for pair in zip(indexes, probs, strict=True) for column in pair]
    probabilities = None
    if head_sizes is not None:
        parts = matrix[:, LABEL_MATRIX_COLUMNS:].split(head_sizes, dim=-1)
        probabilities = {name: part.tolist() for name, part in zip(HEAD_NAMES, parts, strict=True)}
    return StepOutput(label_columns, probabilities)


class ModelRunner:
    def __init__(
        self,
        model: GuardModel,
        kv_cache: torch.Tensor,
        blocks: BlockManager,
        attend: AttentionBackend,
        graphs: GraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.attend = attend
        self.graphs = graphs  # bound to kv_cache (GraphRunner.capture) by whoever built both
        self.eager_steps = 0  # with graphs on: steps that fit no bucket
        self.device = model.device
        self.scratch = GatherScratch()
        # How finely chunks are grouped by query length (`split_by_query_length`): padding costs
        # compute on CPU, a group costs kernel launches on CUDA. Benchmarks flip it to compare.
        self.query_classes_by_powers_of_two = self.device.type == "cpu"

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], with_probabilities: bool = False) -> StepOutput:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for chunk in chunks:
            table = chunk.conversation.block_table
            token_ids += chunk.token_ids
            chunk_positions = range(chunk.start_position, chunk.start_position + chunk.length)
            positions += chunk_positions
            slots += self.blocks.slots(table, chunk.start_position, chunk.start_position + chunk.length)
        if self.graphs is not None:
            step = StepMetadata(token_ids, positions, slots, *self._lengths_and_tables(chunks))
            matrix = self.graphs.run(step, with_probabilities)
            if matrix is not None:
                return step_output(matrix, self.graphs.head_sizes if with_probabilities else None)
            self.eager_steps += 1
        as_tensor = self._to_device
        groups, packed, paged, tables = [], None, None, None
        if self.attend is flex_packed_attention:
            packed = self._packed_keys(chunks)
        elif self.attend is paged_cpu_attention:
            paged = self._paged_chunks(chunks)
        elif self.attend is triton_paged_attention:
            tables = self._paged_tables(chunks)
        else:
            groups = self._attention_groups(chunks)
        batch = AttentionBatch(
            as_tensor(slots), groups, self.blocks.block_size, self.scratch, packed, paged, tables
        )
        logits = self.model.network(
            as_tensor(token_ids), as_tensor(positions), self.kv_cache, batch, self.attend
        )
        matrix = logits.label_matrix(with_probabilities).cpu()  # the step's one device-to-host copy
        sizes = [getattr(logits, name).shape[-1] for name in HEAD_NAMES] if with_probabilities else None
        return step_output(matrix, sizes)

    def _lengths_and_tables(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[list[int], list[int], list[list[int]]]:
        """New tokens, keys after the step and the blocks those keys fill, of each chunk."""
        lengths = [chunk.length for chunk in chunks]
        seq_lens = [chunk.start_position + chunk.length for chunk in chunks]
        tables = [
            chunk.conversation.block_table[: self.blocks.blocks_for(keys)]
            for chunk, keys in zip(chunks, seq_lens, strict=True)
        ]
        return lengths, seq_lens, tables

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return long_tensor(values).to(self.device, non_blocking=True)

    def _packed_keys(self, chunks: list[ScheduledChunk]) -> PackedKeys:
        query_owner: list[int] = []
        query_positions: list[int] = []
        key_slots: list[int] = []
        key_owner: list[int] = []
        key_positions: list[int] = []
        for index, chunk in enumerate(chunks):
            end = chunk.start_position + chunk.length
            query_owner += [index] * chunk.length
            query_positions += range(chunk.start_position, end)
            table = chunk.conversation.block_table
            key_slots += self.blocks.slots(table, 0, end)
            key_owner += [index] * end
            key_positions += range(end)
        as_tensor = self._to_device
        return packed_keys(
            as_tensor(query_owner),
            as_tensor(query_positions),
            as_tensor(key_slots),
            as_tensor(key_owner),
            as_tensor(key_positions),
        )

    def _paged_chunks(self, chunks: list[ScheduledChunk]) -> PagedChunks:
        rows: list[int] = []
        tables: list[int] = []
        row, max_context = 0, 0
        for chunk in chunks:
            context = chunk.start_position + chunk.length
            rows += (row, chunk.start_position, chunk.length, len(tables))
            tables += chunk.conversation.block_table[: self.blocks.blocks_for(context)]
            row, max_context = row + chunk.length, max(max_context, context)
        chunk_table = long_tensor(rows).view(-1, 4)
        return PagedChunks(
            chunk_table,
            long_tensor(tables),
            max(chunk.length for chunk in chunks),
            max_context,
            split_by_work(chunk_table, torch.get_num_threads()),  # once a step, for every layer
        )

    def _paged_tables(self, chunks: list[ScheduledChunk]) -> PagedTables:
        return paged_tables(*self._lengths_and_tables(chunks), self.device)

    def _attention_groups(self, chunks: list[ScheduledChunk]) -> list[AttentionGroup]:
        """Chunks split by query length (`split_by_query_length`), then each part by key length
        (`split_by_key_length`), so that a group pads little in either direction."""
        first_rows, row = [], 0
        for chunk in chunks:
            first_rows.append(row)
            row += chunk.length
        groups = []
        lengths = [chunk.length for chunk in chunks]
        for kind in split_by_query_length(lengths, self.query_classes_by_powers_of_two):
            widths = [
                self.blocks.blocks_for(chunks[index].start_position + chunks[index].length) for index in kind
            ]
            for members in split_by_key_length(widths):
                chosen = [kind[member] for member in members]
                groups.append(self._group([chunks[i] for i in chosen], [first_rows[i] for i in chosen]))
        return groups

    def _group(self, chunks: list[ScheduledChunk], first_rows: list[int]) -> AttentionGroup:
        block_size = self.blocks.block_size
        queries = max(chunk.length for chunk in chunks)
        context = max(chunk.start_position + chunk.length for chunk in chunks)
        table_width = self.blocks.blocks_for(context)
        tables = [chunk.conversation.block_table[:table_width] for chunk in chunks]
        tables = [table + [0] * (table_width - len(table)) for table in tables]
        # [B, 3]: first packed row, first position, token count of each chunk.
        shape = torch.tensor(
            [
                [row, chunk.start_position, chunk.length]
                for row, chunk in zip(first_rows, chunks, strict=True)
            ],
            dtype=torch.long,
        ).to(self.device, non_blocking=True)
        block_tables = torch.tensor(tables, dtype=torch.long).to(self.device, non_blocking=True)

        offsets = torch.arange(queries, device=self.device)
        query_valid = offsets[None, :] < shape[:, 2:3]
        token_rows = torch.where(query_valid, shape[:, 0:1] + offsets[None, :], 0)
        # Padded query rows get position 0 so they attend to one real key and stay finite.
        query_positions = torch.where(query_valid, shape[:, 1:2] + offsets[None, :], 0)
        # Keys are read by whole blocks: key j of a row is position j of its conversation.
        key_positions = torch.arange(table_width * block_size, device=self.device)
        allowed = key_positions[None, None, :] <= query_positions[:, :, None]
        # Additive, in the compute dtype, built once per step: SDPA would convert a bool mask in
        # every layer.
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)
        mask.masked_fill_(~allowed, float("-inf"))
        # Built on the host from the lengths: a device nonzero() would force a sync every step.
        flat_rows: list[int] = []
        token_indexes: list[int] = []
        for index, (row, chunk) in enumerate(zip(first_rows, chunks, strict=True)):
            flat_rows += range(index * queries, index * queries + chunk.length)
            token_indexes += range(row, row + chunk.length)
        valid_flat, valid_tokens = self._to_device(flat_rows), self._to_device(token_indexes)
        return AttentionGroup(token_rows, valid_flat, valid_tokens, block_tables, mask[None])


def split_by_query_length(lengths: list[int], by_powers_of_two: bool = True) -> list[list[int]]:
    """Indexes of `lengths` (new tokens per chunk) by class, shortest first: 1, 2, 3-4, 5-8, ...
    (the longest of a class at most twice its shortest), or only 1 and more than 1.

    Every chunk of a group is padded to the group's longest, and attention costs per padded query.
    Single-token (streaming) chunks never pad to a prompt's length. On CPU padding costs compute, so
    classes are powers of two (docs/benchmarks.md). On CUDA a group costs kernel launches in every
    layer while padded queries cost little compute: there only single-token chunks are kept apart.
    """
    classes: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        key = (length - 1).bit_length() if by_powers_of_two else min(length - 1, 1)
        classes.setdefault(key, []).append(index)
    return [classes[key] for key in sorted(classes)]


def split_by_key_length(widths: list[int]) -> list[list[int]]:
    """Indexes of `widths` (key blocks per chunk) in runs of similar width, narrowest first.

    Every chunk of a group is padded to the group's widest, so one long conversation among many short
    ones would make every member read as many keys as it. Runs bound that to KEY_LENGTH_SPREAD, at the
    price of one group (a few ops per layer) per run.
    """
    order = sorted(range(len(widths)), key=widths.__getitem__)
    runs: list[list[int]] = []
    for index in order:
        if runs:
            narrowest = widths[runs[-1][0]]
            if widths[index] <= max(KEY_LENGTH_SPREAD * narrowest, KEY_BLOCKS_UNSPLIT):
                runs[-1].append(index)
                continue
        runs.append([index])
    return runs
