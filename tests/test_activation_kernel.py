"""SiLU·mul against an fp64 reference: one rounding, tails, strides, ``out=``, the checks.

On the CPU the kernel runs in the Triton interpreter (tiny shapes); on a GPU the same
tests run the compiled kernel (``test_silu_argmax_gpu.py`` adds the real shapes,
``torch.compile``'s kernel as a peer and CUDA graphs).

The exact test: the kernel computes in fp32 and rounds once, so each output equals the
fp64 value rounded to the output dtype, except where that value lies so close to a
rounding boundary (relative ``2^-14``) that fp32's own error may cross it; those may be
one unit off. A second rounding (eager torch's ``silu`` to bf16, then the product)
misses the fp64 rounding on about a quarter of the elements, an indexing error on
nearly all.

The Triton interpreter (the CPU tests) converts fp32 to bf16 by truncation, not to
nearest as the GPU does (``triton/runtime/interpreter.py``, Triton 3.9), so on the CPU
the bf16 outputs are checked against the truncated value; fp16 and the GPU round to
nearest.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from vtensor.kernels.activation import BLOCK, silu_mul
from vtensor.kernels.reference import silu_mul_ref
from vtensor.models import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_rounding(dtype: torch.dtype) -> str:
    return "trunc" if INTERPRETED and dtype == torch.bfloat16 else "rtne"


def rounded(x: torch.Tensor, dtype: torch.dtype, rounding: str) -> torch.Tensor:
    """``x`` in ``dtype``: to nearest (torch's), or bf16 by truncating fp32's bits."""
    if rounding == "rtne":
        return x.to(dtype)
    bits = x.float().view(torch.int32) & -65536  # keep the high 16 bits (0xFFFF0000)
    return bits.view(torch.float32).to(torch.bfloat16)


def make(t: int, inter: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    """``gate_up [t, 2·inter]``: gate ~ N(0, scale²) (both SiLU regimes), up ~ N(0, 4)."""
    gate = torch.randn(t, inter, device=DEVICE) * scale
    up = torch.randn(t, inter, device=DEVICE) * 2
    return torch.cat([gate, up], dim=1).to(dtype)


def exact(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return F.silu(gate) * up


def assert_one_rounding(y: torch.Tensor, gate_up: torch.Tensor, rounding: str = "") -> None:
    """``y`` is the fp64 value rounded once to ``y.dtype`` (see the module docstring);
    ``rounding`` defaults to the kernel's."""
    r, dt = exact(gate_up), y.dtype
    rounding = rounding or kernel_rounding(dt)
    assert y.shape == r.shape and dt == gate_up.dtype
    want = rounded(r, dt, rounding)
    near = rounded(r * (1 + 2.0**-14), dt, rounding) != rounded(r * (1 - 2.0**-14), dt, rounding)
    wrong = (y != want) & ~near
    assert not wrong.any(), (
        f"{int(wrong.sum())} of {y.numel()} not rounded once from fp64, e.g. got "
        f"{y[wrong][:4].tolist()} for {r[wrong][:4].tolist()}"
    )
    # The boundary cases: still within one unit of the output dtype.
    err = (y.double() - r).abs()
    assert bool((err <= 2 * UNIT[y.dtype] * r.abs() + 2.0**-24).all())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("inter", [1, 7, 64, BLOCK, 2 * BLOCK, BLOCK + 37, 3 * BLOCK - 5])
def test_rounds_once_from_the_exact_value(inter: int, dtype: torch.dtype) -> None:
    """Tails and whole blocks (``I`` a multiple of BLOCK takes the unmasked path)."""
    for t in (1, random.randint(2, 5)):
        gate_up = make(t, inter, dtype)
        assert_one_rounding(silu_mul(gate_up), gate_up)


def test_fp32_within_fp32_error() -> None:
    gate_up = make(3, BLOCK + 100, torch.float32)
    y, r = silu_mul(gate_up), exact(gate_up)
    assert y.dtype == torch.float32
    assert bool(((y.double() - r).abs() <= 2.0**-19 * r.abs() + 1e-38).all())


def test_the_reference_path_and_a_second_rounding_differ() -> None:
    """``impl="torch"`` is the fp32 reference rounded once too; eager torch (two roundings)
    fails the same check, so the check can tell them apart."""
    gate_up = make(4, 300, torch.bfloat16)
    assert_one_rounding(silu_mul(gate_up, impl="torch"), gate_up, "rtne")
    gate, up = gate_up.chunk(2, dim=-1)
    with pytest.raises(AssertionError, match="not rounded once"):
        assert_one_rounding(F.silu(gate) * up, gate_up, "rtne")


def test_extremes_follow_the_fp32_formula() -> None:
    """Large |gate|, zeros, infinities: what ``g / (1 + exp(-g)) * u`` gives in fp32 (for
    gate < -88.7 the fp32 exp overflows and the product is a signed zero, as in
    ``torch.compile``'s kernel, where the exact value is a tiny normal number)."""
    g = torch.tensor([-1e4, -100.0, -88.0, -0.0, 0.0, 1e-30, 50.0, 1e4, float("inf")])
    u = torch.tensor([1.5, -2.0, 3.0, 1.0, -1.0, 2.0, -0.5, 0.25, 2.0])
    for dtype in (*LOW, torch.float32):
        gate_up = torch.cat([g, u]).to(dtype)[None].to(DEVICE)
        gf, uf = gate_up.float().chunk(2, dim=-1)
        want = rounded(gf / (1 + torch.exp(-gf)) * uf, dtype, kernel_rounding(dtype))
        got = silu_mul(gate_up)
        # Zeros, infinities and signs exactly; finite values within one unit (the GPU's
        # fp32 exp is not torch's to the last bit).
        fin = want.isfinite()
        assert torch.equal(got.isfinite(), fin) and torch.equal(got[~fin], want[~fin])
        assert torch.equal(got.signbit(), want.signbit()) and torch.equal(got == 0, want == 0)
        unit = UNIT.get(dtype, 2.0**-22)
        diff = (got[fin].double() - want[fin].double()).abs()
        assert bool((diff <= 2 * unit * want[fin].double().abs()).all()), (got, want)


def test_strided_input_and_out_buffer() -> None:
    """gate_up a column slice (row stride > 2I); ``out`` a column slice of a larger buffer,
    written in place and returned; nothing around it touched."""
    base = make(3, 200, torch.bfloat16)
    gate_up = base[:, 40:360]  # [3, 320]: I = 160, row stride 400
    assert gate_up.stride(0) == 400
    big = torch.full((3, 500), 7.0, device=DEVICE, dtype=torch.bfloat16)
    out = big[:, 100:260]
    y = silu_mul(gate_up, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_one_rounding(big[:, 100:260], gate_up.contiguous())
    assert bool((big[:, :100] == 7).all() and (big[:, 260:] == 7).all())


def test_empty_shapes() -> None:
    assert silu_mul(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)
    assert silu_mul(torch.empty(3, 0, device=DEVICE)).shape == (3, 0)


def test_bad_input_is_refused_and_out_untouched() -> None:
    x = make(2, 16, torch.bfloat16)
    out = torch.full((2, 16), 5.0, device=DEVICE, dtype=torch.bfloat16)
    bad = [
        (x[0], ValueError, "T, 2"),  # 1-D
        (x[:, :31], ValueError, "T, 2"),  # odd last dim
        (x.to(torch.int32), TypeError, "one of"),
        (make(2, 16, torch.bfloat16).t().contiguous().t(), ValueError, "unit stride"),
    ]
    for arg, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            silu_mul(arg, out=out if arg.dim() == 2 and arg.shape == x.shape else None)
    for wrong in (torch.empty(2, 17, dtype=torch.bfloat16), torch.empty(2, 16)):
        with pytest.raises(ValueError, match="out must be"):
            silu_mul(x, out=wrong.to(DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        silu_mul(x, out=torch.empty(16, 2, device=DEVICE, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="impl"):
        silu_mul(x, impl="cuda")
    assert bool((out == 5).all())


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path")
def test_model_path_on_the_cpu_stays_eager() -> None:
    """The model's ``silu_mul`` on CPU tensors is eager torch (what HF computes: two
    roundings), not the kernel, whatever the switch says."""
    gate_up = make(3, 40, torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused.silu_mul(gate_up), F.silu(gate) * up)
    gate_up3 = make(6, 40, torch.bfloat16).reshape(2, 3, 80)
    assert torch.equal(fused.silu_mul(gate_up3), F.silu(gate_up3[..., :40]) * gate_up3[..., 40:])


def test_reference_is_fp32_silu_times_up() -> None:
    gate_up = make(2, 33, torch.bfloat16)
    r = silu_mul_ref(gate_up)
    assert r.dtype == torch.float32
    assert torch.allclose(r.double(), exact(gate_up), rtol=1e-6, atol=1e-30)
