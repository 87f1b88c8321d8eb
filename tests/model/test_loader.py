"""Checkpoint loading: single file and sharded, strict key accounting, dtype on request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from processor.model import CheckpointError, load_guard_model
from processor.model.testmodel import write_test_model


def copy_checkpoint(source, destination):
    destination.mkdir()
    for file in source.iterdir():
        shutil.copy(file, destination / file.name)
    return destination


def test_sharded_checkpoint_loads_the_same_weights(tiny_model_dir, tmp_path):
    sharded = write_test_model(tmp_path / "sharded", size="tiny", seed=0, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    single = load_guard_model(tiny_model_dir, device="cpu")
    split = load_guard_model(sharded, device="cpu")
    for (name, left), (_, right) in zip(
        single.network.state_dict().items(), split.network.state_dict().items(), strict=True
    ):
        assert torch.equal(left, right), name


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    broken = copy_checkpoint(tiny_model_dir, tmp_path / "missing")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["query_category_head.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"query_category_head\.weight"):
        load_guard_model(broken, device="cpu")


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path):
    broken = copy_checkpoint(tiny_model_dir, tmp_path / "extra")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_guard_model(broken, device="cpu")


def test_bf16_checkpoint_loads_as_float32_on_request(tiny_model_dir):
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    assert {parameter.dtype for parameter in model.network.parameters()} == {torch.float32}
    assert torch.equal(model.network.model.norm.weight, stored["model.norm.weight"].float())
    bf16 = load_guard_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert {parameter.dtype for parameter in bf16.network.parameters()} == {torch.bfloat16}


def test_labels_come_from_the_checkpoint_maps(tiny_model_dir, tmp_path):
    renamed = copy_checkpoint(tiny_model_dir, tmp_path / "renamed")
    config = json.loads((renamed / "config.json").read_text())
    config["response_risk_level_map"] = {"0": "Fine", "1": "Bad", "2": "Maybe"}
    (renamed / "config.json").write_text(json.dumps(config))
    assert load_guard_model(renamed, device="cpu").labels.risk_levels == ("Fine", "Bad", "Maybe")


def test_unknown_model_says_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder nor a hub id"):
        load_guard_model("Qwen/Qwen3Guard-Stream-0.6B-not-cached-here", device="cpu")


def test_loading_imports_no_compiler_stack(tiny_model_dir):
    """Building the network on the meta device once ran torch's Python decompositions, which import
    torch._dynamo and triton: over a second of every worker start. A fresh interpreter shows it."""
    script = (
        "import sys; from processor.model import load_guard_model; "
        f"load_guard_model({str(tiny_model_dir)!r}, device='cpu'); "
        "print(sorted(name for name in ('torch._dynamo', 'triton') if name in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
