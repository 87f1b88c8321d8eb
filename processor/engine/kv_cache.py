"""The paged KV cache tensor, sized by a memory budget."""

from __future__ import annotations

import torch

from processor.model import cpu_kernel
from processor.model.attention import resolve_attention_backend
from processor.model.config import GuardConfig


def bytes_per_token(config: GuardConfig, dtype: torch.dtype) -> int:
    """KV bytes one token of one conversation occupies, over all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element


# `--kv-cache-dtype`: "auto" is float16 for the C kernel (below), else the model's dtype.
KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, attention_backend: str | None = None
) -> torch.dtype:
    """The cache's element type for a setting ("auto" or a KV_CACHE_DTYPES name).

    auto: float16 where the C kernel reads it (a CPU model in float32, the kernel built with
    _Float16), as llama.cpp stores a CPU model's cache by default; the model's dtype elsewhere. The
    kernel's attention reads every cached key and value of a conversation for each new token, and
    that read is most of its time in a worker's streaming steps: float16 halves it, and a budget
    holds twice the tokens. The price is each key and value rounded once to 11 bits, which moves
    probabilities by up to ~3e-4 on the test models and can flip a near-tie label (docs/benchmarks.md).
    "float32" keeps the cache exact.
    """
    if name == "auto":
        if attention_backend == "paged_cpu" and model_dtype == torch.float32 and _kernel_reads_float16():
            return torch.float16
        return model_dtype
    try:
        return KV_CACHE_DTYPES[name]
    except KeyError:
        choices = ", ".join(["auto", *KV_CACHE_DTYPES])
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of {choices}") from None


def resolve_attention_and_cache(
    attention_backend: str, kv_cache_dtype: str, device: torch.device, model_dtype: torch.dtype
) -> tuple[str, torch.dtype]:
    """The attention backend and the cache's element type for these settings, in that order: a cache
    dtype asked for by name narrows the backends "auto" may pick, and a cache dtype of "auto" follows
    the backend picked (float16 where the C kernel reads it)."""
    requested = None if kv_cache_dtype == "auto" else resolve_kv_cache_dtype(kv_cache_dtype, model_dtype)
    backend = resolve_attention_backend(attention_backend, device, model_dtype, requested)
    return backend, requested or resolve_kv_cache_dtype("auto", model_dtype, backend)


def _kernel_reads_float16() -> bool:
    kernel = cpu_kernel.load()
    return kernel is not None and torch.float16 in kernel.cache_dtypes


# Without a budget, a CPU engine takes this much; a GPU one takes a fraction of free device memory.
DEFAULT_CPU_CACHE_BYTES = 1 << 30


def cache_budget_bytes(
    device: torch.device, budget_bytes: int | None, free_fraction: float | None, reserved_bytes: int = 0
) -> int:
    """`budget_bytes`, or a fraction of the device memory free now less `reserved_bytes` (what is
    spoken for but not yet allocated: the CUDA graphs' pool)."""
    if budget_bytes is not None:
        return budget_bytes
    if device.type == "cuda" and free_fraction is not None:
        free, _total = torch.cuda.mem_get_info(device)
        return int(max(0, free - reserved_bytes) * free_fraction)
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
