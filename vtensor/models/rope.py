"""Rotary position embeddings, with Llama 3 and linear frequency scaling.

The rotation matches HF's ``rotate_half`` convention (the two halves of each
head are the pairs), so checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .config import RopeConfig
from .fused import rotate


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``[head_dim/2]`` fp32 inverse frequencies after the configured scaling."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        return _llama3(inv, rope)
    return inv


def _llama3(inv: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend between."""
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rope tables; :meth:`angles` gathers them at a step's ``positions [T]``.

    The cos/sin table covers ``max_positions`` and is built once, so a CUDA
    graph can gather from it by position.
    """

    # Buffers (register_buffer), which mypy cannot see through nn.Module's __getattr__.
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)build the fp32 tables on the module's device (after ``to_empty``)."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv = inverse_frequencies(self.rope, self.head_dim).to(device)
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv)
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def angles(self, positions: torch.Tensor) -> RopeAngles:
        """cos/sin at ``positions``, gathered once per forward and shared by all layers."""
        return RopeAngles(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


class RopeAngles(NamedTuple):
    cos: torch.Tensor  # [T, 1, head_dim/2], fp32
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, head_dim]``; q and k heads can go in one call (one kernel)."""
        return rotate(x, self.cos, self.sin)
