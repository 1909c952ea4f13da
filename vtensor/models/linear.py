"""The model's one linear-layer dispatch: the small-batch GEMV or ``F.linear``.

At decode batch ≤ 8 a linear layer is a read of its weight; cuBLAS's GEMMs read
the Llama-3-8B shapes at 71-96% of the HBM ceiling, the GEMV
(``vtensor.kernels.gemv``) is built to stream them at the ceiling. Every linear of
the model (q/k/v, o, gate/up, down, lm_head) goes through :func:`linear`, so the
choice is made in one place: the GEMV when ``should_use_gemv`` holds (CUDA,
``M ≤ 8`` rows — under a CUDA graph the padded batch —, bf16/fp16, no bias), else
``F.linear``. On the CPU it is always ``F.linear``: the HF-exactness tests run
the same code as before.

The switch: ``VTENSOR_GEMV=0`` in the environment (read once, at import; tensor
parallel workers inherit it) turns the GEMV off, for A/B benchmarks; in process,
:func:`set_gemv_enabled`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from vtensor.kernels.gemv import gemv, should_use_gemv

_enabled = os.environ.get("VTENSOR_GEMV", "1") != "0"


def set_gemv_enabled(enabled: bool) -> None:
    """Turn the small-batch GEMV on or off for linear layers built or run from now on
    (a CUDA graph keeps the kernels it captured)."""
    global _enabled
    _enabled = enabled


def gemv_enabled() -> bool:
    return _enabled


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by the GEMV where it serves the call."""
    if _enabled and should_use_gemv(x, weight, bias):
        return gemv(x, weight, check=False)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
