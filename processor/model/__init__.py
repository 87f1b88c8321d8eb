"""The Qwen3Guard-Stream network, its checkpoint loader and its label maps."""

from processor.model.config import GuardConfig
from processor.model.labels import LabelMaps, Policy
from processor.model.loader import CheckpointError, GuardModel, load_guard_model

__all__ = ["CheckpointError", "GuardConfig", "GuardModel", "LabelMaps", "Policy", "load_guard_model"]
