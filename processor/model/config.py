"""The checkpoint's config.json, as the few numbers our forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from processor.model.labels import LabelMaps


@dataclass(frozen=True)
class GuardConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    guard_inner_size: int
    labels: LabelMaps

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GuardConfig:
        if config.get("rope_scaling"):
            # Qwen3Guard-Stream checkpoints ship without it; a scaled rope would silently change results.
            raise ValueError(
                f"config.json sets rope_scaling={config['rope_scaling']!r}, which is not supported"
            )
        if config.get("use_sliding_window"):
            raise ValueError("config.json enables sliding-window attention, which is not supported")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            max_position_embeddings=config["max_position_embeddings"],
            guard_inner_size=config["guard_inner_size"],
            labels=LabelMaps.from_config(config),
        )
