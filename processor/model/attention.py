"""Attention over a paged KV cache, for a ragged batch of conversations.

The model calls `paged_attention` once per layer. It stores the new keys and values in their cache
slots, then lets every new token attend to its own conversation's history (itself included) and
nothing else. How the step's tokens map to conversations and slots is described once per step by
`AttentionBatch`, built by the engine's model runner; the layers never loop over conversations.

Backends are swappable: "sdpa" gathers each group's keys into a padded block and calls
scaled_dot_product_attention with a mask (portable, CPU and CUDA); "flex" runs FlexAttention on the
packed tokens (CUDA, no padding); "paged_cpu" runs our C kernel over the paged cache in place (CPU,
float32; see processor/model/kernels/paged_attention.c); "triton" runs our Triton kernel over it in
place (CUDA; processor/model/triton_attention.py). All must give the same results (tests
compare them). A cache is written and read by one backend: "paged_cpu" stores keys transposed
within their blocks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from processor.model import cpu_kernel

# SDPA kernels allowed on CUDA. cuDNN's is left out: it builds an execution plan for every new shape,
# and a streaming step's shape changes every step, so planning would cost host time on the scale of
# the step itself (docs/benchmarks.md). With a mask, this leaves the memory-efficient kernel.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionGroup:
    """Conversations padded to a common query length and key length.

    The runner groups conversations by how many new tokens they bring (single-token streaming
    ones apart, the rest in power-of-two classes) and then by key length, so that one long prompt
    doesn't pad hundreds of one-token rows to its length. Keys are read by whole cache blocks
    (L = table width x block size): a block is one contiguous run per KV head, so the gather copies
    runs instead of single slots.
    """

    token_rows: torch.Tensor  # [B, Q] index into the step's packed tokens (padding -> 0)
    # Where the real (unpadded) queries sit: flat index into [B * Q], and their packed token rows.
    valid_flat: torch.Tensor
    valid_tokens: torch.Tensor
    block_tables: torch.Tensor  # [B, W] cache blocks of each conversation (padding -> block 0)
    mask: torch.Tensor  # [1, B, Q, L] additive: 0 where a query may attend to a key, -inf elsewhere
    _grouped_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def grouped_mask(self, group_size: int) -> torch.Tensor:
        """[1, B, group_size * Q, L]: the mask repeated for each query head of a KV-head group;
        built once per step, used by every layer."""
        if group_size == 1:
            return self.mask
        if group_size not in self._grouped_masks:
            self._grouped_masks[group_size] = self.mask.repeat(1, 1, group_size, 1)
        return self._grouped_masks[group_size]


@dataclass
class PackedKeys:
    """For the flex backend: every chunk's keys packed end to end, and who may see whom."""

    key_slots: torch.Tensor  # [S] flat cache slot of each packed key
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask over [T queries, S keys]


class GatherScratch:
    """Buffers for the keys and values a layer gathers, kept from step to step and reused by every
    layer: on CPU, a fresh buffer above glibc's largest mmap threshold (32 MB) comes from a new mmap
    each time, and page-faulting it in costs more than the gather (see processor.engine.host_memory).
    Holds the largest size asked for."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized [shape] tensor of `like`'s dtype and device; valid until the next take(name)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        fits = buffer is not None and buffer.numel() >= size
        if not fits or (buffer.dtype, buffer.device) != (like.dtype, like.device):
            buffer = self._buffers[name] = like.new_empty(size)
        return buffer[:size].view(shape)


@dataclass
class PagedChunks:
    """For the paged_cpu backend: each chunk's place in the step and its block table, as the kernel
    reads them."""

    chunks: torch.Tensor  # [C, 4] int64: first packed row, first position, length, offset into tables
    tables: torch.Tensor  # [sum of table widths] int64: every chunk's blocks, end to end
    max_length: int  # longest chunk (new tokens)
    max_context: int  # longest chunk's context (keys), for the kernel's scratch
    runs: list[tuple[int, int]]  # chunk ranges [first, last) run on threads at once (one per thread)


@dataclass
class PagedTables:
    """For the triton backend: the step's conversations as its kernel reads them, on the device.
    Conversations with no new tokens (a bucketed step's padding) have equal query starts."""

    query_starts: torch.Tensor  # [B + 1] int32: first packed row of each conversation's new tokens, then T
    seq_lens: torch.Tensor  # [B] int32: keys of each conversation after this step (cached and new)
    block_tables: torch.Tensor  # [B, W] int32: each conversation's cache blocks (padding -> block 0)


def paged_tables(
    lengths: list[int], seq_lens: list[int], tables: list[list[int]], device: torch.device
) -> PagedTables:
    """PagedTables for conversations bringing `lengths` new tokens each, with `seq_lens` keys after
    the step, in `tables` (each at least the blocks its keys fill). Packed into one int32 host buffer:
    one host-to-device copy for the three."""
    count = len(lengths)
    width = max(map(len, tables), default=1) or 1
    values = array("i", [0])
    for length in lengths:
        values.append(values[-1] + length)
    values.extend(seq_lens)
    for table in tables:
        values.extend(table)
        values.extend([0] * (width - len(table)))
    packed = torch.frombuffer(values, dtype=torch.int32).to(device, non_blocking=True)
    return PagedTables(
        packed[: count + 1], packed[count + 1 : 2 * count + 1], packed[2 * count + 1 :].view(count, width)
    )


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] flat cache slot where each new token's key/value is written
    groups: list[AttentionGroup]  # for the sdpa backend
    block_size: int  # slots per cache block
    scratch: GatherScratch  # the runner's, reused from step to step
    packed: PackedKeys | None = None  # for the flex backend
    paged: PagedChunks | None = None  # for the paged_cpu backend
    tables: PagedTables | None = None  # for the triton backend


AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float], torch.Tensor
]


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """kv_layer: [2, kv_heads, slots, head_dim]; stores the new tokens' keys and values ([T, kv_heads, D])."""
    kv_layer[0].index_copy_(1, slot_mapping, key.transpose(0, 1).to(kv_layer.dtype))
    kv_layer[1].index_copy_(1, slot_mapping, value.transpose(0, 1).to(kv_layer.dtype))


def gather_by_head(cache: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cache [kv_heads, N, *row] -> out [kv_heads, len(index), *row]: rows `index` of every head.

    On CPU one index_select per head along its first axis: torch copies whole rows there, where
    selecting along axis 1 goes element by element. On CUDA one call: a kernel launch per head would
    cost more than it saves.
    """
    if cache.is_cuda:
        return torch.index_select(cache, 1, index, out=out)
    for head in range(cache.shape[0]):
        torch.index_select(cache[head], 0, index, out=out[head])
    return out


def read_kv(
    kv_layer: torch.Tensor, index: torch.Tensor, scratch: GatherScratch, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at `index` of the cache's row axis, in `scratch`, in the compute dtype.

    kv_layer [2, kv_heads, N, *row] -> two [kv_heads, len(index), *row] (rows are slots here, whole
    blocks for `read_kv_blocks`).
    """
    shape = (kv_layer.shape[1], index.numel(), *kv_layer.shape[3:])
    keys = gather_by_head(kv_layer[0], index, scratch.take("keys", shape, kv_layer))
    values = gather_by_head(kv_layer[1], index, scratch.take("values", shape, kv_layer))
    return keys.to(dtype), values.to(dtype)


def read_kv_blocks(
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    scratch: GatherScratch,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks of `block_tables` ([B, W]), as [kv_heads, B, W * block_size, head_dim], in `scratch`.

    One index per block instead of one per slot, and the result already in SDPA's layout (keys
    contiguous per conversation and head, which SDPA's CPU flash kernel reads much faster than keys
    strided by their heads).
    """
    kv_heads, slots, head_dim = kv_layer.shape[1:]
    rows, width = block_tables.shape
    blocks = kv_layer.view(2, kv_heads, slots // block_size, block_size * head_dim)
    keys, values = read_kv(blocks, block_tables.reshape(-1), scratch, dtype)
    shape = (kv_heads, rows, width * block_size, head_dim)
    return keys.view(shape), values.view(shape)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Portable backend. query: [T, heads, D]; returns [T, heads, D]."""
    write_kv(key, value, kv_layer, batch.slot_mapping)
    output = torch.empty_like(query)
    for group in batch.groups:
        rows, queries = group.token_rows.shape
        group_query = query.index_select(0, group.token_rows.reshape(-1)).view(
            rows, queries, *query.shape[1:]
        )
        group_key, group_value = read_kv_blocks(
            kv_layer, group.block_tables, batch.block_size, batch.scratch, query.dtype
        )  # [kv_heads, B, L, D]
        attended = grouped_query_attention(group_query, group_key, group_value, group, scale)
        attended = attended.reshape(rows * queries, *query.shape[1:])
        output.index_copy_(0, group.valid_tokens, attended.index_select(0, group.valid_flat))
    return output


def grouped_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """query [B, Q, heads, D], key/value [kv_heads, B, L, D] -> [B, Q, heads, D].

    SDPA sees KV heads as its batch axis and conversations as its head axis ([kv_heads, B, ., D]), so
    the gathered keys are used as they are, contiguous. The query heads that share a KV head are
    folded into the query axis ([kv_heads, B, group * Q, D]), so keys and values are neither copied
    per head nor left to SDPA's `enable_gqa`: torch's SDPA dispatch lets only some CUDA kernels take
    GQA, and with a mask that left cuDNN's (see CUDA_SDPA_BACKENDS) or the math path, which copies
    keys and values per head.
    """
    rows, queries, heads, head_dim = query.shape
    kv_heads = key.shape[0]
    group_size = heads // kv_heads
    # Query head h reads KV head h // group_size (repeat_interleave order), so heads split as (kv, group).
    folded = query.view(rows, queries, kv_heads, group_size, head_dim).permute(2, 0, 3, 1, 4)
    folded = folded.reshape(kv_heads, rows, group_size * queries, head_dim)
    mask = group.grouped_mask(group_size)  # [1, B, group * Q, L], the same for every KV head
    with sdpa_kernel(CUDA_SDPA_BACKENDS) if query.is_cuda else contextlib.nullcontext():
        attended = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
    attended = attended.view(kv_heads, rows, group_size, queries, head_dim).permute(1, 3, 0, 2, 4)
    return attended.reshape(rows, queries, heads, head_dim)


def packed_keys(
    query_owner: torch.Tensor,
    query_positions: torch.Tensor,
    key_slots: torch.Tensor,
    key_owner: torch.Tensor,
    key_positions: torch.Tensor,
) -> PackedKeys:
    """Build the flex block mask once per step: a query sees keys of its own chunk's conversation
    up to its own position (causal within the conversation, nothing across conversations)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_conversation_causal(batch, head, query, key):  # flex's mask_mod signature
        return (query_owner[query] == key_owner[key]) & (key_positions[key] <= query_positions[query])

    block_mask = create_block_mask(
        same_conversation_causal, None, None, query_owner.numel(), key_slots.numel(), device=key_slots.device
    )
    return PackedKeys(key_slots=key_slots, block_mask=block_mask)


@functools.cache  # compiled once per process and device type
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled on CUDA (the fused kernel); eager elsewhere, where flex runs its unfused reference.
    # Chosen by the tensors' device, not by whether CUDA exists: on a GPU machine, CPU tensors sent
    # through the compiled kernel go to inductor's C++ backend, which fails to build them (torch 2.11).
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention


def flex_packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """FlexAttention over the packed tokens: no padding between short and long chunks."""
    assert batch.packed is not None, "the flex backend needs AttentionBatch.packed"
    write_kv(key, value, kv_layer, batch.slot_mapping)
    packed_key, packed_value = read_kv(
        kv_layer, batch.packed.key_slots, batch.scratch, query.dtype
    )  # [kv_heads, S, D]
    attended = _flex_kernel(query.device.type)(
        query.transpose(0, 1)[None],
        packed_key[None],
        packed_value[None],
        block_mask=batch.packed.block_mask,
        scale=scale,
        enable_gqa=True,
    )
    return attended[0].transpose(0, 1)


def paged_cpu_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """The C kernel over the paged cache: no gather, no padding, no mask (CPU, float32; cache float32/16)."""
    assert batch.paged is not None, "the paged_cpu backend needs AttentionBatch.paged"
    kernel = cpu_kernel.require()
    paged = batch.paged
    heads, head_dim = query.shape[1:]
    size = kernel.scratch_floats(
        heads, kv_layer.shape[1], head_dim, batch.block_size, paged.max_length, paged.max_context
    )
    scratch = functools.partial(_paged_scratch, batch.scratch, size, query)  # float32, as the kernel computes
    return kernel.attend(
        query,
        key,
        value,
        kv_layer,
        batch.slot_mapping,
        paged.chunks,
        paged.tables,
        batch.block_size,
        scale,
        paged.runs,
        scratch,
    )


def _paged_scratch(scratch: GatherScratch, size: int, like: torch.Tensor, part: int) -> torch.Tensor:
    return scratch.take(f"paged-{part}", (size,), like)  # one buffer per thread


def triton_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_layer: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel over the paged cache: no gather, no padding, no mask (CUDA; any cache dtype)."""
    assert batch.tables is not None, "the triton backend needs AttentionBatch.tables"
    from processor.model import triton_attention  # imports triton: only once this backend runs

    triton_attention.store_kv(key, value, kv_layer, batch.slot_mapping)
    return triton_attention.paged_attention(query, kv_layer, batch.tables, batch.block_size, scale)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": sdpa_attention,
    "flex": flex_packed_attention,
    "paged_cpu": paged_cpu_attention,
    "triton": triton_paged_attention,
}
CPU_ONLY_BACKENDS = frozenset({"paged_cpu"})  # the C kernel: host memory, float32 compute
# Triton kernels: CUDA, or a CPU under Triton's interpreter (tests). Never picked by "auto" until a GPU
# run has shown them correct there.
CUDA_BACKENDS = frozenset({"triton"})


def triton_interpreted() -> bool:
    """Whether TRITON_INTERPRET asks Triton to interpret kernels (on CPU tensors), not compile them."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype | None = None
) -> str:
    """`name`, or for "auto" the fastest that runs here: the C kernel on a CPU in float32 (over a cache
    it reads: float32, or float16 where it was built with it) when it builds, SDPA otherwise; never
    "triton", which is asked for by name. A backend that cannot run on this device, dtype or cache
    dtype is an error."""
    cache_dtype = cache_dtype or dtype
    if name == "auto":
        kernel = cpu_kernel.load() if device.type == "cpu" and dtype == torch.float32 else None
        return "paged_cpu" if kernel is not None and cache_dtype in kernel.cache_dtypes else "sdpa"
    get_attention_backend(name)  # known?
    if name in CPU_ONLY_BACKENDS:
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError(f"the {name} attention backend runs on the CPU in float32, not {device} {dtype}")
        kernel = cpu_kernel.require()  # asked for by name: fail at start, not at every step
        if cache_dtype not in kernel.cache_dtypes:
            readable = kernel.describe_cache_dtypes()
            raise ValueError(f"the {name} attention backend reads a {readable} KV cache, not {cache_dtype}")
    if name in CUDA_BACKENDS:
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"the {name} attention backend runs Triton kernels on a CUDA device, not {device}; on a "
                "CPU only under Triton's interpreter (TRITON_INTERPRET=1, for tests: slow). Use auto, "
                "sdpa or paged_cpu here"
            )
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"the {name} attention backend needs the triton package, not installed here")
    return name


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None
