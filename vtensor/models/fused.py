"""Elementwise pieces of a decoder layer, fused on the GPU by ``torch.compile``.

A decode step of an 8B model is bound by reading the weights (~5 ms on an
H100); unfused, RMSNorm, rotary and SiLU·up add ~40 tiny kernels per layer,
which cost milliseconds even inside a CUDA graph. Compiled, each function is
one or two Triton kernels. On the CPU they run as written (the same math), so
the HF-exactness tests check the very code the GPU compiles. SiLU·mul on CUDA is
our own kernel instead (same fp32 numerics, faster at large batch; see ``silu_mul``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import torch
import torch.nn.functional as F

from vtensor.kernels import activation
from vtensor.kernels.activation import SILU_MUL_DTYPES
from vtensor.kernels.switch import silu_argmax_enabled

P = ParamSpec("P")
R = TypeVar("R")
TensorFn = Callable[Concatenate[torch.Tensor, P], R]


def gpu_compiled(fn: TensorFn[P, R]) -> TensorFn[P, R]:
    """Run ``fn`` compiled (dynamic shapes) on CUDA tensors, eagerly elsewhere."""
    compiled: list[TensorFn[P, R]] = []

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not x.is_cuda:
            return fn(x, *args, **kwargs)
        if not compiled:
            _allow_models_per_process()
            compiled.append(torch.compile(fn, dynamic=True, fullgraph=True))
        return compiled[0](x, *args, **kwargs)

    return wrapper


def _allow_models_per_process(limit: int = 64) -> None:
    """Dynamo keeps one compiled variant per (dtype, eps, ...) of each function's code, up
    to a process-wide limit (8), and with ``fullgraph`` one more is an error. One model
    needs one or two; a process that builds many models (a test suite, several engines)
    needs more. Raised once, on the first compile, and never lowered."""
    config = torch._dynamo.config
    if getattr(config, "recompile_limit", limit) < limit:
        config.recompile_limit = limit


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, then the weight in the activation dtype: HF's order.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


rms_norm = gpu_compiled(_rms_norm)


@gpu_compiled
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the residual add fused into the norm."""
    h = x + residual
    return _rms_norm(h, weight, eps), h


@gpu_compiled
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with cos/sin cast to the activation dtype."""
    cos, sin = torch.cat((cos, cos), -1).to(x.dtype), torch.cat((sin, sin), -1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@gpu_compiled
def _silu_mul_compiled(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up [..., 2I]`` (gate first). On CUDA, a 2-D
    ``gate_up`` goes to our Triton kernel (``kernels/activation.py``: the numerics
    ``torch.compile`` has, fp32 math and one rounding; built to move its bytes at the
    HBM ceiling, where the compiled kernel moved 1.4 TB/s at 256 tokens);
    ``VTENSOR_SILU_ARGMAX=0`` gives it back to ``torch.compile``. Elsewhere it runs
    eagerly (two roundings, HF's)."""
    if (
        gate_up.is_cuda
        and gate_up.dim() == 2
        and gate_up.stride(-1) == 1
        and gate_up.dtype in SILU_MUL_DTYPES
        and silu_argmax_enabled()
    ):
        return activation.silu_mul(gate_up, impl="triton")
    return _silu_mul_compiled(gate_up)
