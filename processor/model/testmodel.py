"""Random-weight Qwen3Guard-Stream checkpoints in the official file layout.

These checkpoints are for tests, benchmarks and offline demos only: the weights are random, so their
verdicts mean nothing. What is real is everything around the weights: the config fields, the label maps,
the state-dict key names, shapes and dtype, the (optional) sharding, and a real-vocabulary Qwen3
tokenizer with the Qwen3 chat template, so code that loads them loads a published checkpoint the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from processor.model.tokenizer import SpecialTokenIds, build_qwen3_tokenizer, special_token_ids


@dataclass(frozen=True)
class CheckpointShape:
    """The size-dependent config fields of a checkpoint."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    guard_inner_size: int
    # Random deep stacks at std 0.02 everywhere collapse every position onto one direction (one label
    # everywhere, and chaotic sensitivity to context). An embedding this large keeps token identity
    # visible while attention still moves the last hidden state noticeably, so verdicts vary
    # across tokens and a cache bug still changes them.
    embedding_std: float
    max_position_embeddings: int = 8192


CHECKPOINT_SHAPES: dict[str, CheckpointShape] = {
    "tiny": CheckpointShape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        guard_inner_size=32,
        embedding_std=0.02,
    ),
    "small": CheckpointShape(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=768,
        guard_inner_size=128,
        embedding_std=0.08,
    ),
    # Exactly the published Qwen3Guard-Stream-0.6B shape, for realistic memory and latency benchmarks.
    "0.6b-shape": CheckpointShape(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        guard_inner_size=512,
        embedding_std=0.3,
    ),
    # The 4B and 8B backbones as published; their guard_inner_size is not known here (512 assumed),
    # which hardly matters for the benchmarks these shapes exist for.
    "4b-shape": CheckpointShape(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        guard_inner_size=512,
        embedding_std=0.3,
    ),
    "8b-shape": CheckpointShape(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        guard_inner_size=512,
        embedding_std=0.3,
    ),
}
TEST_MODEL_SIZES: tuple[str, ...] = tuple(CHECKPOINT_SHAPES)

# Label order as the published checkpoints give it; code must read it from config.json, never from here.
RISK_LEVEL_LABELS = ("Safe", "Unsafe", "Controversial")
CATEGORY_LABELS = (
    "Violent",
    "Sexual Content or Sexual Acts",
    "Suicide & Self-Harm",
    "Politically Sensitive Topics",
    "PII",
    "Copyright Violation",
    "Non-violent Illegal Acts",
    "Unethical Acts",
)
QUERY_CATEGORY_LABELS = (*CATEGORY_LABELS, "Jailbreak")

# Qwen3's embedding rows, padded past the tokenizer's 151,669 ids.
QWEN3_VOCAB_SIZE = 151936
QWEN3_RMS_NORM_EPS = 1e-6
QWEN3_ROPE_THETA = 1_000_000

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# Normal-init standard deviations. Output projections into the residual stream are scaled down with
# depth (as GPT-2 does) so a deep random stack stays stable; the classification heads get a wide spread
# (logit std ~2) so the argmax labels differ across tokens: Safe, Unsafe and Controversial all appear.
LINEAR_STD = 0.02
NORM_WEIGHT_STD = 0.1  # norm weights are 1 + this noise: near identity, yet the weights matter
HEAD_STD_TIMES_SQRT_INNER = 2.0


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict tensor and the normal distribution its random values come from."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def nbytes_bf16(self) -> int:
        return math.prod(self.shape) * 2


def write_test_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, shards: int = 1) -> Path:
    """Write a random-weight checkpoint of `size` (one of TEST_MODEL_SIZES) into `out_dir`.

    The same `seed` gives the same weights whatever `shards` is. Returns `out_dir`.
    """
    if size not in CHECKPOINT_SHAPES:
        raise ValueError(f"unknown test model size {size!r}: use one of {', '.join(TEST_MODEL_SIZES)}")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    shape = CHECKPOINT_SHAPES[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_qwen3_tokenizer()
    if len(tokenizer) > QWEN3_VOCAB_SIZE:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, over the {QWEN3_VOCAB_SIZE} embedding rows")
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, as the hub files have it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)

    config = checkpoint_config(shape, tokenizer_ids=special_token_ids(tokenizer))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_weights(out_dir, tensor_specs(shape), seed=seed, shards=shards)
    return out_dir


def checkpoint_config(shape: CheckpointShape, tokenizer_ids: SpecialTokenIds) -> dict:
    """config.json as the published checkpoints have it (no pad_token_id: they have none)."""
    return {
        "architectures": ["Qwen3ForGuardModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen3.Qwen3Config",
            "AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel",
        },
        "model_type": "qwen3",
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": QWEN3_VOCAB_SIZE,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": QWEN3_RMS_NORM_EPS,
        "rope_theta": QWEN3_ROPE_THETA,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": shape.num_hidden_layers,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer_ids.endoftext,
        "eos_token_id": tokenizer_ids.im_end,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "guard_inner_size": shape.guard_inner_size,
        "num_risk_level": len(RISK_LEVEL_LABELS),
        "num_category": len(CATEGORY_LABELS),
        "num_query_risk_level": len(RISK_LEVEL_LABELS),
        "num_query_category": len(QUERY_CATEGORY_LABELS),
        "response_risk_level_map": _label_map(RISK_LEVEL_LABELS),
        "response_category_map": _label_map(CATEGORY_LABELS),
        "query_risk_level_map": _label_map(RISK_LEVEL_LABELS),
        "query_category_map": _label_map(QUERY_CATEGORY_LABELS),
    }


def _label_map(labels: tuple[str, ...]) -> dict[str, str]:
    return {str(index): label for index, label in enumerate(labels)}


def tensor_specs(shape: CheckpointShape) -> list[TensorSpec]:
    """Every tensor of the official state dict, in a fixed order (the order random draws are made in)."""
    hidden, inner = shape.hidden_size, shape.guard_inner_size
    q_out = shape.num_attention_heads * shape.head_dim
    kv_out = shape.num_key_value_heads * shape.head_dim

    def linear(name: str, out_features: int, in_features: int, std: float = LINEAR_STD) -> TensorSpec:
        return TensorSpec(name, (out_features, in_features), std)

    def norm(name: str, features: int) -> TensorSpec:
        return TensorSpec(name, (features,), NORM_WEIGHT_STD, mean=1.0)

    residual_std = LINEAR_STD / math.sqrt(2 * shape.num_hidden_layers)
    specs = [TensorSpec("model.embed_tokens.weight", (QWEN3_VOCAB_SIZE, hidden), shape.embedding_std)]
    for layer in range(shape.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        specs += [
            norm(f"{prefix}.input_layernorm.weight", hidden),
            linear(f"{prefix}.self_attn.q_proj.weight", q_out, hidden),
            linear(f"{prefix}.self_attn.k_proj.weight", kv_out, hidden),
            linear(f"{prefix}.self_attn.v_proj.weight", kv_out, hidden),
            linear(f"{prefix}.self_attn.o_proj.weight", hidden, q_out, std=residual_std),
            norm(f"{prefix}.self_attn.q_norm.weight", shape.head_dim),
            norm(f"{prefix}.self_attn.k_norm.weight", shape.head_dim),
            norm(f"{prefix}.post_attention_layernorm.weight", hidden),
            linear(f"{prefix}.mlp.gate_proj.weight", shape.intermediate_size, hidden),
            linear(f"{prefix}.mlp.up_proj.weight", shape.intermediate_size, hidden),
            linear(f"{prefix}.mlp.down_proj.weight", hidden, shape.intermediate_size, std=residual_std),
        ]
    specs.append(norm("model.norm.weight", hidden))
    head_std = HEAD_STD_TIMES_SQRT_INNER / math.sqrt(inner)
    # The response path's names carry no prefix; the query path has the same names with "query_".
    for path, num_risk_levels, num_categories in (
        ("", len(RISK_LEVEL_LABELS), len(CATEGORY_LABELS)),
        ("query_", len(RISK_LEVEL_LABELS), len(QUERY_CATEGORY_LABELS)),
    ):
        specs += [
            linear(f"{path}risk_level_category_pre.weight", inner, hidden),
            norm(f"{path}risk_level_category_layernorm.weight", inner),
            linear(f"{path}risk_level_head.weight", num_risk_levels, inner, std=head_std),
            linear(f"{path}category_head.weight", num_categories, inner, std=head_std),
        ]
    return specs


def _write_weights(out_dir: Path, specs: list[TensorSpec], seed: int, shards: int) -> None:
    # safetensors metadata "format": "pt" is what transformers checks before loading.
    metadata = {"format": "pt"}
    generator = torch.Generator().manual_seed(seed)
    if shards == 1:
        save_file(dict(_draw(specs, generator)), str(out_dir / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    groups = _split_into_shards(specs, shards)
    for number, group in enumerate(groups, start=1):
        # One shard in memory at a time: the 0.6B shape is 1.2 GB in bf16.
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(dict(_draw(group, generator)), str(out_dir / filename), metadata=metadata)
        weight_map.update({spec.name: filename for spec in group})
    index = {
        "metadata": {"total_size": sum(spec.nbytes_bf16 for spec in specs)},
        "weight_map": weight_map,
    }
    (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _split_into_shards(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """Consecutive groups of about equal bytes, never empty (fewer groups if there are fewer tensors)."""
    target = sum(spec.nbytes_bf16 for spec in specs) / shards
    groups: list[list[TensorSpec]] = [[]]
    filled = 0
    for index, spec in enumerate(specs):
        tensors_left = len(specs) - index
        groups_left = shards - len(groups)
        if groups[-1] and groups_left > 0 and (filled >= target * len(groups) or tensors_left <= groups_left):
            groups.append([])
        groups[-1].append(spec)
        filled += spec.nbytes_bf16
    return groups


def _draw(specs: list[TensorSpec], generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    # Drawn in float32, then cast, one tensor at a time so peak memory stays near the bf16 result.
    for spec in specs:
        values = torch.empty(spec.shape, dtype=torch.float32)
        values.normal_(mean=spec.mean, std=spec.std, generator=generator)
        yield spec.name, values.to(torch.bfloat16)
