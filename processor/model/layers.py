"""The small building blocks of a Qwen3 decoder: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 as the reference implementation does, back to the input dtype, then
        # scale. F.rms_norm is one fused kernel where torch has one (CUDA): hand-written
        # pow/mean/add/rsqrt/mul would be five launches, four norms a layer.
        normalized = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normalized.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with explicit positions, so ragged batches need no padding."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Computed on the CPU, then moved to the device being built on: on the meta device (where the
        # loader builds) this arithmetic runs through torch's Python decompositions, which import
        # torch._dynamo and triton first (~1 s of every process start). The loader's `reset` gives the
        # real values on the real device.
        initial = self._inverse_frequencies(torch.device("cpu")).to(torch.get_default_device())
        self.register_buffer("inv_freq", initial, persistent=False)

    def _inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        )
        return 1.0 / (self.theta**exponents)

    def reset(self, device: torch.device) -> None:
        """Recompute the (non-checkpoint) frequencies after a meta-device build."""
        self.inv_freq = self._inverse_frequencies(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim] (the rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class GatedMLP(nn.Module):
    """down(silu(gate x) * up x), with gate and up as one GEMM (`gate_up_proj`: gate's rows, then up's)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
