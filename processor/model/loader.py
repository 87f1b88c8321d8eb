"""Load an official Qwen3Guard-Stream checkpoint (local folder or hub id) into our network.

No remote code: config.json is read as data and the safetensors are loaded by name into
`Qwen3GuardNetwork`, which is what lets the engine run the model over a paged KV cache. The network's
fused projections (`fused_parameters`) are the checkpoint's tensors concatenated by rows, each part's
shape checked: every checkpoint tensor lands somewhere, whole and unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from processor.model.config import GuardConfig
from processor.model.labels import LabelMaps
from processor.model.qwen3_guard import HEAD_PARAMETER_NAMES, Qwen3GuardNetwork, fused_parameters
from processor.model.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# What a checkpoint folder needs from the hub: weights, config and tokenizer, never remote code.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


class CheckpointError(ValueError):
    """The checkpoint does not match the Qwen3Guard-Stream layout; the message names what is wrong."""


@dataclass
class GuardModel:
    """A loaded checkpoint: the network plus what callers need to interpret its outputs."""

    network: Qwen3GuardNetwork
    config: GuardConfig
    raw_config: dict[str, Any]
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def labels(self) -> LabelMaps:
        return self.config.labels

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast | None:
        """The checkpoint's tokenizer, or None when the folder ships none (ids-only use)."""
        if not (self.path / "tokenizer.json").is_file():
            return None
        return load_tokenizer(self.path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what the weights ship in and what GPUs run fast; CPUs get float32 for speed and accuracy.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_checkpoint(model: str | Path) -> Path:
    """A local folder as is; otherwise a hub id, downloaded once (or read from the hub cache offline)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint folder or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(model), allow_patterns=HUB_FILE_PATTERNS))
    except Exception as error:  # the hub client raises many types; all mean "could not get it"
        raise CheckpointError(
            f"{model} is neither a local checkpoint folder nor a hub id that could be downloaded "
            f"or found in the hub cache ({type(error).__name__}: {error})"
        ) from error


def read_config(checkpoint: Path) -> dict[str, Any]:
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{checkpoint} has no config.json")
    return json.loads(config_path.read_text())


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a single-file or sharded checkpoint."""
    if (checkpoint / SINGLE_FILE).is_file():
        return [checkpoint / SINGLE_FILE]
    index_path = checkpoint / SHARD_INDEX
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        return [checkpoint / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{checkpoint} has neither {SINGLE_FILE} nor {SHARD_INDEX}")


def checkpoint_key(parameter_name: str) -> str:
    """Our parameter name -> the official state-dict key (of an unfused parameter)."""
    for official, ours in HEAD_PARAMETER_NAMES.items():
        if parameter_name == ours:
            return official
    return parameter_name


def checkpoint_parts(parameter_name: str, config: GuardConfig) -> list[tuple[str, int | None]]:
    """Our parameter name -> the official keys it is made of, in row order, each with its row count
    (None: the parameter is that one tensor, unfused)."""
    for suffix, parts in fused_parameters(config).items():
        if parameter_name.endswith("." + suffix):
            prefix = parameter_name[: -len(suffix)]
            return [(prefix + part, rows) for part, rows in parts]
    return [(checkpoint_key(parameter_name), None)]


def assemble(
    parts: list[tuple[str, int | None]], tensors: dict[str, torch.Tensor], shape: torch.Size
) -> torch.Tensor:
    """One parameter from its checkpoint tensors: the tensor itself, or the parts stacked by rows
    after checking that each has the rows and columns the parameter's slice of it needs."""
    if len(parts) == 1 and parts[0][1] is None:
        return tensors[parts[0][0]]
    for key, rows in parts:
        expected = (rows, *shape[1:])
        if tuple(tensors[key].shape) != expected:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the model's config needs {expected}"
            )
    return torch.cat([tensors.pop(key) for key, _ in parts])  # pop: each part's memory goes with it


def read_state_dict(
    checkpoint: Path, expected_keys: set[str], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint):
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key not in expected_keys:
                    raise CheckpointError(f"unexpected tensor {key!r} in {file.name}")
                tensors[key] = handle.get_tensor(key).to(dtype)
    missing = sorted(expected_keys - tensors.keys())
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} lacks tensor(s): {', '.join(missing)}")
    return tensors


def load_guard_model(
    model: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> GuardModel:
    """Load a Qwen3Guard-Stream checkpoint; dtype defaults to bf16 on GPU and float32 on CPU."""
    checkpoint = resolve_checkpoint(model)
    raw_config = read_config(checkpoint)
    config = GuardConfig.from_dict(raw_config)
    target_device = torch.device(device) if device is not None else default_device()
    target_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(target_device)

    with torch.device("meta"):
        network = Qwen3GuardNetwork(config)
    shapes = {name: parameter.shape for name, parameter in network.named_parameters()}
    parts = {name: checkpoint_parts(name, config) for name in shapes}
    expected_keys = {key for name_parts in parts.values() for key, _ in name_parts}
    tensors = read_state_dict(checkpoint, expected_keys, target_device, target_dtype)
    network.load_state_dict(
        {name: assemble(parts[name], tensors, shape) for name, shape in shapes.items()},
        strict=True,
        assign=True,
    )
    network.model.rotary.reset(target_device)
    network.eval().requires_grad_(False)
    return GuardModel(
        network=network,
        config=config,
        raw_config=raw_config,
        name=str(model),
        path=checkpoint,
        device=target_device,
        dtype=target_dtype,
    )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    try:
        return names[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}") from None
