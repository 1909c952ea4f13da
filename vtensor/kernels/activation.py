"""SiLU·mul: ``out = silu(gate) * up`` where ``gate_up [T, 2I]`` holds gate then up.

The MLP's activation between gate_up and down: bandwidth-bound (it reads ``2I``
and writes ``I`` elements a token, a few flops each), so the kernel is a copy
with arithmetic in it. Program ``(t, j)`` owns columns ``[j·BLOCK, (j+1)·BLOCK)``
of row ``t``: a 2-D grid, so a decode step at ``T = 1`` still has ``I / BLOCK``
programs and ``T = 256`` has thousands, each loading ``BLOCK`` elements of gate
and of up in 16-byte vectors (``BLOCK = 1024`` elements over 4 warps: 8 a
thread). ``BLOCK`` does not depend on ``T``, so every ``T`` runs one compiled
variant (no compile mid-serving when a new batch size arrives).

**Numerics**: what ``torch.compile`` (torch 2.13's inductor, default settings)
computes for ``F.silu(gate) * up``, operation for operation: both halves upcast to
fp32, ``g / (exp(-g) + 1) * u`` in fp32 (inductor's decomposition of SiLU; its
``exp`` is libdevice's, not the fast ``ex2.approx``; its ``/`` is Triton's, which
the GPU computes as ``div.full.f32``, within 2 ulp), and one rounding to the output
dtype (to nearest). So outputs agree with the compiled kernel's (the GPU test checks
it) and lie within one unit of the exact value. For ``gate < -88.7`` fp32's
``exp(-gate)`` overflows and the result is a signed zero where the exact value is a
tiny normal number (inductor's too). Eager torch rounds ``silu(gate)`` to bf16 before
the multiply (two roundings); it stays the CPU path (``models/fused.py``), which the
HF-exactness tests check.

**Graph-safe**: no host sync, no scratch; the output is allocated (from a
graph's pool under capture) or passed in as ``out``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import interpreted, use_triton
from .reference import silu_mul_ref

SILU_MUL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def _silu_mul_kernel(
    X, Out, inter, stride_x, stride_o,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)`` (64-bit: ``T·2I`` may pass 2^31), columns block
    ``program_id(1)``; up starts ``inter`` elements after gate in the row.
    ``LIBDEVICE``: False only in the interpreter, which has no libdevice (its
    ``tl.exp`` is numpy's, also accurate)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    gate_ptr = X + row * stride_x + cols
    if EVEN:  # no column tail: unmasked, fully vectorized
        g = tl.load(gate_ptr).to(tl.float32)
        u = tl.load(gate_ptr + inter).to(tl.float32)
    else:
        ok = cols < inter
        g = tl.load(gate_ptr, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gate_ptr + inter, mask=ok, other=0.0).to(tl.float32)
    # inductor's code for F.silu(gate) * up, op for op (its exp is libdevice's, its `/`
    # Triton's): fp32 throughout, one rounding at the store.
    e = libdevice.exp(-g) if LIBDEVICE else tl.exp(-g)
    y = g / (e + 1.0) * u
    out_ptr = Out + row * stride_o + cols
    if EVEN:
        tl.store(out_ptr, y.to(Out.dtype.element_ty))
    else:
        tl.store(out_ptr, y.to(Out.dtype.element_ty), mask=ok)


def check_silu_mul_args(gate_up: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``gate_up [T, 2I]`` (unit last stride, bf16/fp16/fp32) and ``out [T, I]`` of its
    dtype and device with a unit last stride (a new one when None); returns ``out``."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2*I], got {tuple(gate_up.shape)}")
    if gate_up.dtype not in SILU_MUL_DTYPES:
        raise TypeError(f"gate_up must be one of {SILU_MUL_DTYPES}, got {gate_up.dtype}")
    if gate_up.stride(1) != 1 and gate_up.shape[1] > 1:
        raise ValueError("gate_up needs a unit stride in its last dim")
    shape = (gate_up.shape[0], gate_up.shape[1] // 2)
    if out is None:
        return torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    if tuple(out.shape) != shape or out.dtype != gate_up.dtype or out.device != gate_up.device:
        raise ValueError(
            f"out must be {shape} {gate_up.dtype} on {gate_up.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(1) != 1 and shape[1] > 1:
        raise ValueError("out needs a unit stride in its last dim")
    return out


def silu_mul(
    gate_up: torch.Tensor, out: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` as ``[T, I]`` in gate_up's dtype (fp32
    math, one rounding; see the module docstring). ``out`` receives it when given.
    ``impl``: ``"auto"`` (Triton on CUDA, the fp32 reference elsewhere unless
    ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``."""
    out = check_silu_mul_args(gate_up, out)
    t, inter = out.shape
    if t == 0 or inter == 0:
        return out
    if not use_triton(gate_up, impl=impl):
        out.copy_(silu_mul_ref(gate_up))
        return out
    grid = (t, triton.cdiv(inter, BLOCK))
    _silu_mul_kernel[grid](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        BLOCK=BLOCK, EVEN=inter % BLOCK == 0, LIBDEVICE=not interpreted(), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
