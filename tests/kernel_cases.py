"""Builders shared by the kernel tests: arenas, requests, error metric."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vtensor.kvcache import KVLayout

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN (unwritten or broken)"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@dataclass
class Case:
    layout: KVLayout
    arena: torch.Tensor
    k: torch.Tensor  # layer view
    v: torch.Tensor
    slots: list[int]

    def row_starts(self) -> torch.Tensor:
        rows = [self.layout.row_start(s) for s in self.slots]
        return torch.tensor(rows, dtype=torch.int32, device=self.arena.device)


def make_case(
    batch: int,
    max_tokens: int,
    q_heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    device: str,
    layers: int = 3,
    layer: int = 1,
) -> Case:
    layout = KVLayout(
        num_slots=batch + 2,
        max_tokens=max_tokens,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=dim,
        dtype=dtype,
    )
    arena = torch.randn(layout.shape, device=device).to(dtype)
    slots = random.sample(range(layout.num_slots), batch)  # non-contiguous, unordered
    return Case(layout, arena, layout.k_view(arena, layer), layout.v_view(arena, layer), slots)


def ints(values: list[int], device: str | torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)
