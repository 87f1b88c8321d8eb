"""Turns a scheduled batch into tensors, runs one forward pass, and returns the labels on the host.

Per-step metadata (positions, cache slots, attention groups) is built here once and handed to every
layer; labels and probabilities are computed on the device and copied to the host in one transfer.
With CUDA graphs on (`cuda_graphs.GraphRunner`), a step that fits a captured bucket replays its graph;
any other step runs eagerly here, through the same attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from processor.engine.block_manager import BlockManager
from processor.engine.cuda_graphs import GraphRunner
from processor.engine.scheduler import Schedule
from processor.engine.step_metadata import StepMetadata, long_tensor, step_metadata
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
    def run(self, schedule: Schedule, with_probabilities: bool = False) -> StepOutput:
        block_tables = [conversation.block_table for conversation in schedule.conversations]
        step = step_metadata(
            schedule.token_ids,
            schedule.start_positions,
            schedule.lengths,
            block_tables,
            self.blocks.block_size,
        )
        if self.graphs is not None:
            matrix = self.graphs.run(step, with_probabilities)
            if matrix is not None:
                return step_output(matrix, self.graphs.head_sizes if with_probabilities else None)
            self.eager_steps += 1
        groups, packed, paged, tables = [], None, None, None
        if self.attend is flex_packed_attention:
            packed = self._packed_keys(step)
        elif self.attend is paged_cpu_attention:
            paged = self._paged_chunks(step)
        elif self.attend is triton_paged_attention:
            tables = self._paged_tables(step)
        else:
            groups = self._attention_groups(step, schedule.lengths)
        token_ids, positions, slots = self._to_device(step.token_ids, step.positions, step.slots)
        batch = AttentionBatch(slots, groups, self.blocks.block_size, self.scratch, packed, paged, tables)
        logits = self.model.network(token_ids, positions, self.kv_cache, batch, self.attend)
        matrix = logits.label_matrix(with_probabilities).cpu()  # the step's one device-to-host copy
        sizes = [getattr(logits, name).shape[-1] for name in HEAD_NAMES] if with_probabilities else None
        return step_output(matrix, sizes)

    def _to_device(self, *columns: torch.Tensor, dtype: torch.dtype = torch.long) -> list[torch.Tensor]:
        """`columns` (1-d host tensors) on the device, as `dtype`, sent in one host-to-device copy."""
        if self.device.type == "cpu":
            return [column.to(dtype) for column in columns]
        packed = torch.cat(columns).to(dtype).to(self.device, non_blocking=True)
        return list(packed.split([column.numel() for column in columns]))

    def _packed_keys(self, step: StepMetadata) -> PackedKeys:
        """Every conversation's keys, end to end: key k of conversation c is its position k."""
        count, block_size = step.lengths.numel(), self.blocks.block_size
        conversations = torch.arange(count)
        query_owner = torch.repeat_interleave(conversations, step.lengths, output_size=step.positions.numel())
        keys = int(step.seq_lens.sum())
        key_owner = torch.repeat_interleave(conversations, step.seq_lens, output_size=keys)
        key_starts = torch.cumsum(step.seq_lens, 0) - step.seq_lens
        key_positions = torch.arange(keys) - key_starts[key_owner]
        key_slots = (
            step.block_tables[key_owner, key_positions // block_size] * block_size
            + key_positions % block_size
        )
        return packed_keys(*self._to_device(query_owner, step.positions, key_slots, key_owner, key_positions))

    def _paged_chunks(self, step: StepMetadata) -> PagedChunks:
        """The C kernel's chunk table: each conversation's first packed row, first position, new
        tokens, and where its row of the step's block tables starts."""
        count, width = step.block_tables.shape
        chunk_table = torch.stack(
            (step.query_starts[:-1], step.start_positions, step.lengths, torch.arange(count) * width), dim=1
        )
        return PagedChunks(
            chunk_table,
            step.block_tables.view(-1),
            step.max_length,
            step.max_seq_len,
            split_by_work(chunk_table, torch.get_num_threads()),  # once a step, for every layer
        )

    def _paged_tables(self, step: StepMetadata) -> PagedTables:
        """The Triton kernel's columns, int32, in one host-to-device copy."""
        query_starts, seq_lens, block_tables = self._to_device(
            step.query_starts, step.seq_lens, step.block_tables.view(-1), dtype=torch.int32
        )
        return PagedTables(query_starts, seq_lens, block_tables.view(step.block_tables.shape))

    def _attention_groups(self, step: StepMetadata, lengths: list[int]) -> list[AttentionGroup]:
        """Chunks split by query length (`split_by_query_length`), then each part by key length
        (`split_by_key_length`), so that a group pads little in either direction."""
        block_size = self.blocks.block_size
        widths = [-(-keys // block_size) for keys in step.seq_lens.tolist()]
        start_positions = step.start_positions
        groups = []
        for kind in split_by_query_length(lengths, self.query_classes_by_powers_of_two):
            for members in split_by_key_length([widths[index] for index in kind]):
                chosen = [kind[member] for member in members]
                queries = max(map(lengths.__getitem__, chosen))
                table_width = max(map(widths.__getitem__, chosen))
                groups.append(self._group(step, start_positions, long_tensor(chosen), queries, table_width))
        return groups

    def _group(
        self,
        step: StepMetadata,
        start_positions: torch.Tensor,
        members: torch.Tensor,
        queries: int,
        table_width: int,
    ) -> AttentionGroup:
        """The AttentionGroup of the step's conversations `members`, padded to `queries` new tokens and
        `table_width` blocks of keys. Its indexes are built on the host and sent in one copy: a device
        nonzero() would force a sync every step."""
        count, device = members.numel(), self.device
        first_rows, first_positions = step.query_starts[members], start_positions[members]
        if queries == 1:  # one new token each (streaming): no padded rows
            token_rows, query_positions = first_rows, first_positions
            valid_flat, valid_tokens = torch.arange(count), first_rows
        else:
            offsets = torch.arange(queries)
            valid = offsets < step.lengths[members, None]
            token_rows = torch.where(valid, first_rows[:, None] + offsets, 0).view(-1)
            # Padded query rows get position 0 so they attend to one real key and stay finite.
            query_positions = torch.where(valid, first_positions[:, None] + offsets, 0).view(-1)
            valid_flat, valid_tokens = valid.view(-1).nonzero().view(-1), token_rows[valid.view(-1)]
        tables = step.block_tables[members, :table_width].reshape(-1)
        token_rows, query_positions, block_tables, valid_flat, valid_tokens = self._to_device(
            token_rows, query_positions, tables, valid_flat, valid_tokens
        )
        # Keys are read by whole blocks: key j of a row is position j of its conversation.
        key_positions = torch.arange(table_width * self.blocks.block_size, device=device)
        # Additive, in the compute dtype, built once per step: SDPA would convert a bool mask in
        # every layer.
        mask = torch.zeros((count, queries, key_positions.numel()), dtype=self.model.dtype, device=device)
        mask.masked_fill_(key_positions > query_positions.view(count, queries, 1), float("-inf"))
        return AttentionGroup(
            token_rows.view(count, queries),
            valid_flat,
            valid_tokens,
            block_tables.view(count, table_width),
            mask[None],
        )


def split_by_query_length(lengths: list[int], by_powers_of_two: bool = True) -> list[list[int]]:
    """Indexes of `lengths` (new tokens per chunk) by class, shortest first: 1, 2, 3-4, 5-8, ...
    (the longest of a class at most twice its shortest), or only 1 and more than 1.

    Every chunk of a group is padded to the group's longest, and attention costs per padded query.
    Single-token (streaming) chunks never pad to a prompt's length. On CPU padding costs compute, so
    classes are powers of two (docs/benchmarks.md). On CUDA a group costs kernel launches in every
    layer while padded queries cost little compute: there only single-token chunks are kept apart.
    """
    if max(lengths, default=0) == 1:  # the streaming step: one class
        return [list(range(len(lengths)))]
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
    widest = 0  # the current run may take members up to this wide
    for index in order:
        if runs and widths[index] <= widest:
            runs[-1].append(index)
        else:  # a run's first member is its narrowest
            runs.append([index])
            widest = max(KEY_LENGTH_SPREAD * widths[index], KEY_BLOCKS_UNSPLIT)
    return runs
