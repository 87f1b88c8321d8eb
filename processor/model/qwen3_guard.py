"""Qwen3Guard-Stream: a Qwen3 decoder with per-token risk and category heads.

Module names follow the official checkpoint's state-dict keys (`model.layers.N.self_attn.o_proj`,
`risk_level_head`, ...) so weights load by name. Two exceptions, each one GEMM where the checkpoint has
several: `qkv_proj` holds q_proj, k_proj and v_proj stacked by rows, `gate_up_proj` holds gate_proj and
up_proj (`FUSED_PARAMETERS`; the loader concatenates them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from processor.model.attention import AttentionBackend, AttentionBatch, sdpa_attention
from processor.model.config import GuardConfig
from processor.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary


def qkv_rows(config: GuardConfig) -> list[int]:
    """Rows of q_proj, k_proj and v_proj: query heads, then KV heads twice, each head_dim wide."""
    query = config.num_attention_heads * config.head_dim
    key_value = config.num_key_value_heads * config.head_dim
    return [query, key_value, key_value]


def fused_parameters(config: GuardConfig) -> dict[str, list[tuple[str, int]]]:
    """Our fused parameter's name suffix -> the checkpoint tensors it stacks by rows, in order, each
    with its row count. One GEMM reads the same weights as the separate ones did, and launches once."""
    query, key_value, _ = qkv_rows(config)
    mlp = config.intermediate_size
    return {
        "self_attn.qkv_proj.weight": [
            ("self_attn.q_proj.weight", query),
            ("self_attn.k_proj.weight", key_value),
            ("self_attn.v_proj.weight", key_value),
        ],
        "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", mlp), ("mlp.up_proj.weight", mlp)],
    }


class Qwen3Attention(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        # Output rows of the query, key and value parts, in that order (`qkv_rows`).
        self.qkv_sizes = qkv_rows(config)
        self.qkv_proj = nn.Linear(hidden, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # Qwen3 normalizes queries and keys per head before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        batch: AttentionBatch,
        attend: AttentionBackend,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        # Column views of one GEMM's output: each row of a part is still contiguous in head_dim.
        query, key, value = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        query = self.q_norm(query.view(tokens, self.num_heads, self.head_dim))
        key = self.k_norm(key.view(tokens, self.num_kv_heads, self.head_dim))
        value = value.view(tokens, self.num_kv_heads, self.head_dim)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        attended = attend(query, key, value, kv_layer, batch, self.scale)
        return self.o_proj(attended.reshape(tokens, self.num_heads * self.head_dim))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        batch: AttentionBatch,
        attend: AttentionBackend,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary, kv_layer, batch, attend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Qwen3Backbone(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        # Uninitialized (weights come from the checkpoint): nn.Embedding's own init draws normal values,
        # which on the meta device the loader builds on runs through torch's Python decompositions and
        # imports torch._dynamo and triton first: over a second of every process start, for nothing.
        self.embed_tokens = nn.Embedding.from_pretrained(
            torch.empty(config.vocab_size, config.hidden_size), freeze=True
        )
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)


class GuardHead(nn.Module):
    """x = RMSNorm(W_pre h); risk and category logits from x (as the checkpoint's modeling_qwen3_guard.py)."""

    def __init__(self, hidden_size: int, inner_size: int, num_levels: int, num_categories: int, eps: float):
        super().__init__()
        self.pre = nn.Linear(hidden_size, inner_size, bias=False)
        self.norm = RMSNorm(inner_size, eps)
        self.level = nn.Linear(inner_size, num_levels, bias=False)
        self.category = nn.Linear(inner_size, num_categories, bias=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.norm(self.pre(hidden))
        return self.level(inner), self.category(inner)


# The checkpoint stores each guard head's four tensors under flat names; this maps them onto GuardHead.
HEAD_PARAMETER_NAMES: dict[str, str] = {
    "risk_level_category_pre.weight": "response_head.pre.weight",
    "risk_level_category_layernorm.weight": "response_head.norm.weight",
    "risk_level_head.weight": "response_head.level.weight",
    "category_head.weight": "response_head.category.weight",
    "query_risk_level_category_pre.weight": "query_head.pre.weight",
    "query_risk_level_category_layernorm.weight": "query_head.norm.weight",
    "query_risk_level_head.weight": "query_head.level.weight",
    "query_category_head.weight": "query_head.category.weight",
}


@dataclass
class GuardLogits:
    """Per-token logits of the four heads, each [tokens, classes]."""

    risk: torch.Tensor
    category: torch.Tensor
    query_risk: torch.Tensor
    query_category: torch.Tensor

    def label_matrix(self, with_probabilities: bool = False) -> torch.Tensor:
        """[tokens, 8] float32: each head's argmax class and its softmax probability, head after head
        in field order; with probabilities, every head's whole softmax follows, in the same order. One
        tensor, so that a step reads its results back in one device-to-host copy."""
        columns, probabilities = [], []
        for head_logits in (self.risk, self.category, self.query_risk, self.query_category):
            softmax = head_logits.float().softmax(dim=-1)
            probability, index = softmax.max(dim=-1)
            columns += [index.float(), probability]
            probabilities.append(softmax)
        matrix = torch.stack(columns, dim=-1)
        return torch.cat([matrix, *probabilities], dim=-1) if with_probabilities else matrix


# The four heads by name, in GuardLogits' field order (results and `score --all-heads` use these).
HEAD_NAMES: tuple[str, ...] = tuple(field.name for field in fields(GuardLogits))
LABEL_MATRIX_COLUMNS = 2 * len(HEAD_NAMES)  # class and probability of each head


class Qwen3GuardNetwork(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.config = config
        labels = config.labels
        eps = config.rms_norm_eps
        self.model = Qwen3Backbone(config)
        self.response_head = GuardHead(
            config.hidden_size, config.guard_inner_size, len(labels.risk_levels), len(labels.categories), eps
        )
        self.query_head = GuardHead(
            config.hidden_size,
            config.guard_inner_size,
            len(labels.query_risk_levels),
            len(labels.query_categories),
            eps,
        )

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
        attend: AttentionBackend = sdpa_attention,
    ) -> GuardLogits:
        """token_ids, positions: [T], packed across conversations.

        kv_cache: [layers, 2, kv_heads, slots, head_dim], the paged cache the attention reads and fills.
        """
        hidden = self.model.embed_tokens(token_ids)
        rotary = self.model.rotary(positions, hidden.dtype)
        for layer, kv_layer in zip(self.model.layers, kv_cache, strict=True):
            hidden = layer(hidden, rotary, kv_layer, batch, attend)
        hidden = self.model.norm(hidden)
        risk, category = self.response_head(hidden)
        query_risk, query_category = self.query_head(hidden)
        return GuardLogits(risk, category, query_risk, query_category)
