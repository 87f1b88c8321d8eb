"""Attention over a paged KV cache, for a ragged batch of conversations.

The model calls `paged_attention` once per layer. It stores the new keys and values in their cache
slots, then lets every new token attend to its own conversation's history (itself included) and
nothing else. How the step's tokens map to conversations and slots is described once per step by
`AttentionBatch`, built by the engine's model runner; the layers never loop over conversations.

Backends are swappable: "sdpa" gathers each group's keys into a padded block and calls
scaled_dot_product_attention with a mask (portable, CPU and CUDA); "flex" runs FlexAttention on the
packed tokens (CUDA, no padding). Both must give the same results (tests compare them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class AttentionGroup:
    """Conversations padded to a common query length and key length.

    The runner puts single-token (streaming) conversations in one group and multi-token (prompt,
    backlog, rebuild) conversations in another, so one long prompt doesn't pad hundreds of
    one-token rows to its length.
    """

    token_rows: torch.Tensor  # [B, Q] index into the step's packed tokens (padding -> 0)
    query_valid: torch.Tensor  # [B, Q] bool
    key_slots: torch.Tensor  # [B, L] flat cache slot of each key position (padding -> 0)
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where a query may attend to a key


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] flat cache slot where each new token's key/value is written
    groups: list[AttentionGroup]
    # Packed-token description for the flex backend (None when it is not in use).
    flex_state: object | None = None


AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionBatch, float], torch.Tensor
]


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """kv_layer: [2, num_slots, kv_heads, head_dim]; stores the new tokens' keys and values."""
    kv_layer[0].index_copy_(0, slot_mapping, key.to(kv_layer.dtype))
    kv_layer[1].index_copy_(0, slot_mapping, value.to(kv_layer.dtype))


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
        group_query = query[group.token_rows].transpose(1, 2)  # [B, heads, Q, D]
        group_key = kv_layer[0][group.key_slots].transpose(1, 2)  # [B, kv_heads, L, D]
        group_value = kv_layer[1][group.key_slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            group_query,
            group_key.to(query.dtype),
            group_value.to(query.dtype),
            attn_mask=group.mask,
            scale=scale,
            enable_gqa=True,
        )
        attended = attended.transpose(1, 2).reshape(rows * queries, *query.shape[1:])
        valid = group.query_valid.reshape(-1)
        output[group.token_rows.reshape(-1)[valid]] = attended[valid]
    return output


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None
