"""q/k/v and gate/up as one GEMM each: the loader stacks the checkpoint's tensors, whole and unchanged,
and refuses parts whose shape the config does not give."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from processor.model import CheckpointError, load_guard_model
from processor.model.qwen3_guard import fused_parameters


def test_fused_parameters_are_the_checkpoint_tensors_stacked_by_rows(tiny_model_dir):
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    model = load_guard_model(tiny_model_dir, device="cpu", dtype="float32")
    parameters = dict(model.network.named_parameters())
    fused = fused_parameters(model.config)
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for suffix, parts in fused.items():
            expected = torch.cat([stored[prefix + part].float() for part, _ in parts])
            assert torch.equal(parameters[prefix + suffix], expected), prefix + suffix
            assert [rows for _, rows in parts] == [stored[prefix + part].shape[0] for part, _ in parts]
    # Every checkpoint tensor went somewhere: as itself, or as a part of a fused parameter.
    assert sum(p.numel() for p in parameters.values()) == sum(t.numel() for t in stored.values())


def copy_with(source, destination, edit) -> None:
    shutil.copytree(source, destination)
    tensors = load_file(str(destination / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})


def test_a_part_of_the_wrong_shape_is_named(tiny_model_dir, tmp_path):
    def narrow_v(tensors):
        key = "model.layers.1.self_attn.v_proj.weight"
        tensors[key] = tensors[key][:-1].clone()

    copy_with(tiny_model_dir, tmp_path / "narrow", narrow_v)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*shape"):
        load_guard_model(tmp_path / "narrow", device="cpu")


def test_a_missing_part_is_named(tiny_model_dir, tmp_path):
    copy_with(tiny_model_dir, tmp_path / "missing", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_guard_model(tmp_path / "missing", device="cpu")
