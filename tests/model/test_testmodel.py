"""Random-weight test checkpoints: the official layout, determinism, sharding, and varied verdicts."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from safetensors import safe_open

from processor.model.testmodel import (
    CHECKPOINT_SHAPES,
    TEST_MODEL_SIZES,
    checkpoint_config,
    tensor_specs,
    write_test_model,
)
from processor.model.tokenizer import load_tokenizer, special_token_ids
from tests.model.reference import ReferenceGuard

# The published Qwen3Guard-Stream-0.6B config.json.
PUBLISHED_0_6B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "guard_inner_size": 512,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "eos_token_id": 151645,
    "num_risk_level": 3,
    "num_category": 8,
    "num_query_risk_level": 3,
    "num_query_category": 9,
}
RISK_MAP = {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
CATEGORY_MAP = {
    "0": "Violent",
    "1": "Sexual Content or Sexual Acts",
    "2": "Suicide & Self-Harm",
    "3": "Politically Sensitive Topics",
    "4": "PII",
    "5": "Copyright Violation",
    "6": "Non-violent Illegal Acts",
    "7": "Unethical Acts",
}
QUERY_CATEGORY_MAP = {**CATEGORY_MAP, "8": "Jailbreak"}


def read_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The official state dict written out from the notes, independently of testmodel.tensor_specs."""
    hidden, inner, head_dim = config["hidden_size"], config["guard_inner_size"], config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    mlp = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (q_out, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_out, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_out, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_out),
            f"{prefix}.self_attn.q_norm.weight": (head_dim,),
            f"{prefix}.self_attn.k_norm.weight": (head_dim,),
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.up_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, mlp),
        }
    shapes |= {
        "risk_level_category_pre.weight": (inner, hidden),
        "risk_level_category_layernorm.weight": (inner,),
        "risk_level_head.weight": (config["num_risk_level"], inner),
        "category_head.weight": (config["num_category"], inner),
        "query_risk_level_category_pre.weight": (inner, hidden),
        "query_risk_level_category_layernorm.weight": (inner,),
        "query_risk_level_head.weight": (config["num_query_risk_level"], inner),
        "query_category_head.weight": (config["num_query_category"], inner),
    }
    return shapes


def read_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - safe_open is not a dict


def test_sizes_are_named_for_the_cli():
    assert TEST_MODEL_SIZES[:3] == ("tiny", "small", "0.6b-shape")
    assert set(TEST_MODEL_SIZES) == set(CHECKPOINT_SHAPES)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "small_model_dir"])
def test_checkpoint_files_are_the_official_layout(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    names = {path.name for path in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any("index" in name for name in names)


def test_config_has_every_published_field(tiny_model_dir):
    config = read_config(tiny_model_dir)
    assert config["architectures"] == ["Qwen3ForGuardModel"]
    assert config["model_type"] == "qwen3"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qwen3.Qwen3Config",
        "AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel",
    }
    tiny = CHECKPOINT_SHAPES["tiny"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["guard_inner_size"]) == (
        tiny.hidden_size,
        tiny.num_hidden_layers,
        tiny.guard_inner_size,
    )
    size_fields = {field.name for field in dataclasses.fields(tiny)}
    size_independent = {key: value for key, value in PUBLISHED_0_6B.items() if key not in size_fields}
    assert {key: config[key] for key in size_independent} == size_independent
    assert config["hidden_act"] == "silu"
    assert config["attention_bias"] is False
    assert config["torch_dtype"] == "bfloat16"
    assert config["response_risk_level_map"] == RISK_MAP
    assert config["query_risk_level_map"] == RISK_MAP
    assert config["response_category_map"] == CATEGORY_MAP
    assert config["query_category_map"] == QUERY_CATEGORY_MAP
    assert "pad_token_id" not in config  # the published checkpoints have none


def test_0_6b_shape_is_the_published_config(qwen3_tokenizer):
    config = checkpoint_config(CHECKPOINT_SHAPES["0.6b-shape"], special_token_ids(qwen3_tokenizer))
    assert {key: config[key] for key in PUBLISHED_0_6B} == PUBLISHED_0_6B
    shapes = expected_tensor_shapes(config)
    assert {spec.name: spec.shape for spec in tensor_specs(CHECKPOINT_SHAPES["0.6b-shape"])} == shapes
    # Qwen3-0.6B: 0.44B parameters outside the (tied) embedding.
    non_embedding = sum(math.prod(shape) for name, shape in shapes.items() if "embed_tokens" not in name)
    assert 0.43e9 < non_embedding < 0.45e9


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "small_model_dir"])
def test_weights_have_exactly_the_official_keys_shapes_and_dtype(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    tensors = read_tensors(model_dir / "model.safetensors")
    assert {key: tuple(value.shape) for key, value in tensors.items()} == expected_tensor_shapes(
        read_config(model_dir)
    )
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in tensors  # tied to the embedding


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir, tmp_path):
    original = read_tensors(tiny_model_dir / "model.safetensors")
    again = read_tensors(write_test_model(tmp_path / "again", size="tiny", seed=0) / "model.safetensors")
    other = read_tensors(write_test_model(tmp_path / "other", size="tiny", seed=1) / "model.safetensors")
    assert all(torch.equal(original[key], again[key]) for key in original)
    assert not any(torch.equal(original[key], other[key]) for key in original)


def test_sharded_checkpoint_has_a_consistent_index_and_the_same_weights(tiny_model_dir, tmp_path):
    sharded = write_test_model(tmp_path / "sharded", size="tiny", seed=0, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()

    single = read_tensors(tiny_model_dir / "model.safetensors")
    assert set(index["weight_map"]) == set(single)
    total_bytes = 0
    for file in files:
        shard = read_tensors(sharded / file)
        assert {key for key, name in index["weight_map"].items() if name == file} == set(shard)
        for key, value in shard.items():
            assert torch.equal(value, single[key])
            total_bytes += value.numel() * value.element_size()
    assert index["metadata"]["total_size"] == total_bytes


def test_more_shards_than_tensors_gives_one_tensor_per_shard(tmp_path):
    tensor_count = len(tensor_specs(CHECKPOINT_SHAPES["tiny"]))
    sharded = write_test_model(tmp_path / "many", size="tiny", shards=tensor_count + 5)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == tensor_count


def test_tokenizer_is_saved_with_the_chat_template(tiny_model_dir, qwen3_tokenizer):
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == qwen3_tokenizer.chat_template
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["pad_token"] == "<|endoftext|>"
    loaded = load_tokenizer(tiny_model_dir)
    assert special_token_ids(loaded) == special_token_ids(qwen3_tokenizer)
    assert read_config(tiny_model_dir)["eos_token_id"] == loaded.eos_token_id


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "small_model_dir"])
def test_random_guard_says_every_risk_level_on_random_text(fixture, request):
    # Tests of flagging and debouncing need Safe, Unsafe and Controversial all to occur.
    model_dir = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(model_dir)
    words = ["how", " to", " build", " a", " bomb", " Привет", " 你好", " cook", " pasta", " 42", ",", "."]
    rng = random.Random(0)
    conversation = [
        {"role": "user", "content": "".join(rng.choices(words, k=80))},
        {"role": "assistant", "content": "".join(rng.choices(words, k=120))},
    ]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    probabilities = ReferenceGuard(model_dir).probabilities(list(ids))  # loads the backbone strictly
    for head in ("risk", "query_risk"):
        counts = torch.bincount(probabilities[head].argmax(-1), minlength=3)
        assert (counts >= len(ids) // 20).all(), f"{head} labels {counts.tolist()} over {len(ids)} tokens"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown test model size 'huge'"):
        write_test_model(tmp_path, size="huge")
    with pytest.raises(ValueError, match="shards must be at least 1"):
        write_test_model(tmp_path, size="tiny", shards=0)
