"""The `triton` attention backend's kernels: the KV store and paged attention over the cache in place.

Imported only when that backend runs (processor/model/attention.py imports it inside the backend):
triton comes with torch's CUDA wheels only and costs start-up time to import, and neither loading a
model nor the other backends need it. Under Triton's interpreter (TRITON_INTERPRET=1 set before triton
is first imported) the same kernels run on CPU tensors, which is how the tests check them without a
GPU (tests/model/test_triton_attention.py).

One attention launch serves every kind of step (single-token streaming, 1-9-token chunks, long
prompts, any mix): the grid is (query tiles, KV heads), sized from the step's token and conversation
counts only, and each program finds its conversation, its query rows and its key range by reading
`query_starts` and `seq_lens` from device memory. So a step's shape (bucketed) fixes the launch, and
the launch can be captured in a CUDA graph and replayed with new metadata in the same buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from processor.model.attention import PagedTables

# Read when the kernels below are defined: triton.jit makes interpreted functions then, or compiled ones.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Query rows of a tile (query tokens x the query heads of one KV head): tl.dot on a GPU takes 16 at
# least; the float32 accumulator (rows x head_dim) stays in registers, and 64 x 128 compiles for four
# warps without spilling. Longer prompts take more tiles.
MIN_BLOCK_M, MAX_BLOCK_M = 16, 64
BLOCK_N = 32  # keys a program reads per iteration


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    key_stride_token,
    key_stride_head,
    value_stride_token,
    value_stride_head,
    cache_stride_kv,
    cache_stride_head,
    cache_stride_slot,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_HEADS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    """One program per new token: its key and value, every KV head, into its cache slot. A negative
    slot marks a padding token (a bucketed step's filler): it writes nothing."""
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, KV_HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    # The slot's test folded into a bound: the interpreter turns tensor & scalar-bool into int32.
    dims_written = tl.where(slot >= 0, HEAD_DIM, 0)
    mask = (heads[:, None] < KV_HEADS) & (dims[None, :] < dims_written)
    target = heads[:, None] * cache_stride_head + slot * cache_stride_slot + dims[None, :]
    key = tl.load(
        key_ptr + token * key_stride_token + heads[:, None] * key_stride_head + dims[None, :], mask=mask
    )
    tl.store(cache_ptr + target, key.to(cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(
        value_ptr + token * value_stride_token + heads[:, None] * value_stride_head + dims[None, :], mask=mask
    )
    tl.store(cache_ptr + cache_stride_kv + target, value.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _find_conversation(query_start_ptr, tile, conversations, BLOCK_Q: tl.constexpr):
    """The conversation whose query tiles include `tile`. Conversation c's tiles are numbered from
    query_starts[c] // BLOCK_Q + c, which rises with c and leaves room for its ceil(length / BLOCK_Q)
    tiles; so the answer is the last c whose first tile is at most `tile` (a binary search)."""
    # Typed: a compiled kernel may see `conversations` as the constant 1, and the loop needs int32.
    low: tl.int32 = 0
    high: tl.int32 = conversations
    while low < high:
        middle = (low + high) // 2
        first_tile = tl.load(query_start_ptr + middle) // BLOCK_Q + middle
        if first_tile <= tile:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    query_ptr,
    cache_ptr,
    block_table_ptr,
    query_start_ptr,
    seq_len_ptr,
    scale_log2,
    conversations,
    query_stride_token,
    query_stride_head,
    out_stride_token,
    out_stride_head,
    cache_stride_kv,
    cache_stride_head,
    cache_stride_slot,
    table_stride,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Program (tile, kv_head): up to BLOCK_Q new tokens of one conversation, with the GROUP query
    heads that read KV head `kv_head`, as BLOCK_M rows (row = token * GROUP + head in the group), so
    every key and value tile loaded serves all of them. Online softmax in float32 over the keys up
    to the tile's last position; a row sees keys at or before its own position (causal)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    conversation = _find_conversation(query_start_ptr, tile, conversations, BLOCK_Q)
    query_start = tl.load(query_start_ptr + conversation)
    query_length = tl.load(query_start_ptr + conversation + 1) - query_start
    local_tile = tile - (query_start // BLOCK_Q + conversation)
    if local_tile * BLOCK_Q >= query_length:  # past its conversation's tiles, or a padding conversation
        return
    # Keys cached before this step; new token i of the chunk sits at position `cached + i`.
    cached = tl.load(seq_len_ptr + conversation) - query_length

    rows = tl.arange(0, BLOCK_M)
    token = local_tile * BLOCK_Q + rows // GROUP  # within the chunk
    head = kv_head * GROUP + rows % GROUP
    row_valid = (token < query_length) & (rows < BLOCK_Q * GROUP)
    position = cached + token
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_valid = dims < HEAD_DIM
    query = tl.load(
        query_ptr
        + (query_start + token)[:, None] * query_stride_token
        + head[:, None] * query_stride_head
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if DOT_FP32:
        query = query.to(tl.float32)

    key_base = cache_ptr + kv_head * cache_stride_head
    value_base = key_base + cache_stride_kv
    table = block_table_ptr + conversation * table_stride
    # Exclusive end of the keys any row of this tile may see: its last token's position + 1.
    key_end = cached + tl.minimum((local_tile + 1) * BLOCK_Q, query_length)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    for key_start in range(0, key_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
        # Per key, not per tile: BLOCK_N and the cache's block size are independent.
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + keys % BLOCK_SIZE
        key_t = tl.load(  # [HEAD_DIM_PADDED, BLOCK_N]: transposed by its pointers, for the dot
            key_base + slot[None, :] * cache_stride_slot + dims[:, None],
            mask=dim_valid[:, None] & key_valid[None, :],
            other=0.0,
        )
        value = tl.load(
            value_base + slot[:, None] * cache_stride_slot + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        if DOT_FP32:
            scores = tl.dot(query, key_t.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(query, key_t.to(query.dtype))
        scores = scores * scale_log2  # base-2 exponent: exp2 below
        allowed = row_valid[:, None] & (keys[None, :] <= position[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Only padding rows see no key (a real row sees key 0 in the first tile): their maximum stays
        # -inf, and 0 in its place keeps exp2 from -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.math.exp2(scores - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        if DOT_FP32:
            update = tl.dot(weights, value.to(tl.float32), input_precision="ieee")
        else:
            update = tl.dot(weights.to(query.dtype), value.to(query.dtype))
        acc = acc * rescale[:, None] + update
        row_max = new_max

    acc = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    tl.store(
        out_ptr
        + (query_start + token)[:, None] * out_stride_token
        + head[:, None] * out_stride_head
        + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton attention kernels run on CUDA tensors, not {tensor.device}; on a CPU only under "
            "Triton's interpreter, with TRITON_INTERPRET=1 set before triton is first imported"
        )


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' keys and values ([T, kv_heads, head_dim]) into kv_layer ([2, kv_heads,
    slots, head_dim]) at `slot_mapping` ([T]); tokens whose slot is negative are skipped."""
    _check_device(kv_layer)
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    key, value = _unit_last_stride(key), _unit_last_stride(value)
    _store_kv_kernel[(tokens,)](
        key,
        value,
        kv_layer,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        KV_HEADS_PADDED=triton.next_power_of_2(kv_heads),
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
    )


def query_rows(tokens: int, conversations: int, group: int) -> int:
    """BLOCK_M for a step's shape: enough rows for an average conversation's new tokens times its
    query heads per KV head, within MIN_BLOCK_M..MAX_BLOCK_M. From the shape alone, so that a bucketed
    step always launches the same kernel."""
    per_conversation = -(-tokens // max(conversations, 1))
    rows = triton.next_power_of_2(per_conversation * group)
    return max(MIN_BLOCK_M, triton.next_power_of_2(group), min(MAX_BLOCK_M, rows))


def paged_attention(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    tables: PagedTables,
    block_size: int,
    scale: float,
    block_m: int | None = None,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """query [T, heads, head_dim] -> [T, heads, head_dim]: each conversation's new tokens (rows
    query_starts[c] .. query_starts[c + 1]) attend to its first seq_lens[c] keys, read through its
    block table. Rows past query_starts[-1] (a bucketed step's padding) are left unwritten.

    block_m / block_n override the tile sizes (tests); BLOCK_M must hold the query heads of a group.
    """
    _check_device(query)
    tokens, heads, head_dim = query.shape
    kv_heads = kv_layer.shape[1]
    group = heads // kv_heads
    conversations = tables.seq_lens.shape[0]
    block_m = block_m or query_rows(tokens, conversations, group)
    block_q = block_m // group
    if block_q < 1:
        raise ValueError(f"block_m {block_m} holds fewer rows than the {group} query heads of a KV head")
    out = torch.empty_like(query)
    if tokens == 0 or conversations == 0:
        return out
    query = _unit_last_stride(query)
    # Tile counts: conversation c's tiles start at query_starts[c] // block_q + c (_find_conversation),
    # so the last ends by tokens // block_q + conversations whatever the lengths.
    grid = (tokens // block_q + conversations, kv_heads)
    _paged_attention_kernel[grid](
        out,
        query,
        kv_layer,
        tables.block_tables,
        tables.query_starts,
        tables.seq_lens,
        scale * 1.4426950408889634,  # log2(e): the kernel exponentiates with exp2
        conversations,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        tables.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        # float32 products in float32 (not TF32); the interpreter's tl.dot on bfloat16 is wrong, so
        # there every dtype is widened.
        DOT_FP32=query.dtype == torch.float32 or INTERPRETED,
    )
    return out


def _unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels step through head_dim one element at a time."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
