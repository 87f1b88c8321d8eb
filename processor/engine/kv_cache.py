"""The paged KV cache tensor, sized by a memory budget."""

from __future__ import annotations

import torch

from processor.model.config import GuardConfig


def bytes_per_token(config: GuardConfig, dtype: torch.dtype) -> int:
    """KV bytes one token of one conversation occupies, over all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element


# `--kv-cache-dtype`: "auto" stores keys and values in the model's dtype.
KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for a setting ("auto" or a KV_CACHE_DTYPES name)."""
    if name == "auto":
        return model_dtype
    try:
        return KV_CACHE_DTYPES[name]
    except KeyError:
        choices = ", ".join(["auto", *KV_CACHE_DTYPES])
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of {choices}") from None


# Without a budget, a CPU engine takes this much; a GPU one takes a fraction of free device memory.
DEFAULT_CPU_CACHE_BYTES = 1 << 30


def cache_budget_bytes(device: torch.device, budget_bytes: int | None, free_fraction: float | None) -> int:
    if budget_bytes is not None:
        return budget_bytes
    if device.type == "cuda" and free_fraction is not None:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * free_fraction)
    return DEFAULT_CPU_CACHE_BYTES


def allocate_kv_cache(
    config: GuardConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[layers, 2 (key, value), kv_heads, slots, head_dim]; slot = block * block_size + offset.

    KV-head-major, so that a block's keys for one head are one contiguous [block_size, head_dim] run:
    gathering whole blocks yields [kv_heads, conversations, keys, head_dim] with the keys contiguous,
    the layout SDPA reads fastest (see processor.model.attention).
    """
    return torch.zeros(
        config.num_hidden_layers,
        2,
        config.num_key_value_heads,
        num_blocks * block_size,
        config.head_dim,
        device=device,
        dtype=dtype,
    )
