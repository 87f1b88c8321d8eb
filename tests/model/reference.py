"""An independent reference for the guard: transformers' own Qwen3Model plus the head math written out.

Shares no code with processor.model, so agreement means our network, loader and attention are right.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3Model

HEAD_KEYS = {
    "risk": ("risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head"),
    "category": ("risk_level_category_pre", "risk_level_category_layernorm", "category_head"),
    "query_risk": (
        "query_risk_level_category_pre",
        "query_risk_level_category_layernorm",
        "query_risk_level_head",
    ),
    "query_category": (
        "query_risk_level_category_pre",
        "query_risk_level_category_layernorm",
        "query_category_head",
    ),
}


class ReferenceGuard:
    def __init__(self, checkpoint: Path) -> None:
        config = json.loads((checkpoint / "config.json").read_text())
        self.eps = config["rms_norm_eps"]
        backbone_config = Qwen3Config(
            **{k: v for k, v in config.items() if k not in ("architectures", "auto_map")}
        )
        backbone_config._attn_implementation = "eager"
        self.backbone = Qwen3Model(backbone_config).float().eval()
        tensors = {
            key: value.float() for key, value in load_file(str(checkpoint / "model.safetensors")).items()
        }
        self.backbone.load_state_dict(
            {key.removeprefix("model."): value for key, value in tensors.items() if key.startswith("model.")},
            strict=True,
        )
        self.tensors = tensors

    @torch.no_grad()
    def probabilities(self, token_ids: list[int]) -> dict[str, torch.Tensor]:
        """head name -> [tokens, classes] softmax probabilities over one whole-sequence forward."""
        hidden = self.backbone(torch.tensor([token_ids])).last_hidden_state[0]
        out = {}
        for head, (pre, norm, classifier) in HEAD_KEYS.items():
            inner = hidden @ self.tensors[f"{pre}.weight"].T
            inner = inner * torch.rsqrt(inner.pow(2).mean(-1, keepdim=True) + self.eps)
            inner = inner * self.tensors[f"{norm}.weight"]
            out[head] = (inner @ self.tensors[f"{classifier}.weight"].T).softmax(-1)
        return out
