"""rope_store_kv (rotary + K/V store in one kernel) against rope computed in fp32.

The reference here is the rotation written out pair by pair in fp32 (not the
wrapper's torch composition, which is checked against it too). On the CPU the
kernel runs in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``);
on a GPU machine the same tests run the compiled kernel.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from vtensor.kernels import rope_store_kv
from vtensor.kernels.reference import rope_ref
from vtensor.kvcache import KVLayout

from .kernel_cases import ints

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# The Triton interpreter (3.9) converts fp32 to bf16 by truncation, not rounding to
# nearest (a bf16 cast's error is up to 2u there): its bf16 cases get 2u per cast (the
# cos/sin cast and the result). Compiled kernels round to nearest: one rounding, 1u.
INTERPRETED = DEVICE == "cpu"
SHAPES = [(4, 4, 64), (8, 2, 64), (4, 1, 128), (2, 2, 128)]  # (q_heads, kv_heads, dim)


class Step:
    """A random step: qkv, angles at random positions, a cache layer view, distinct rows."""

    def __init__(self, n: int, hq: int, hkv: int, dim: int, dtype: torch.dtype) -> None:
        self.hq, self.hkv, self.dim = hq, hkv, dim
        self.layout = KVLayout(3, 16, 2, hkv, dim, dtype)
        self.arena = torch.randn(self.layout.shape, device=DEVICE).to(dtype)
        self.before = self.arena.clone()
        self.qkv = (torch.randn(n, (hq + 2 * hkv) * dim, device=DEVICE) * 3).to(dtype)
        pos = torch.randint(0, 100_000, (n, 1, 1), device=DEVICE).float()
        inv = 1.0 / (500_000.0 ** (torch.arange(0, dim, 2, device=DEVICE) / dim))
        self.cos, self.sin = (pos * inv).cos(), (pos * inv).sin()
        self.rows = ints(random.sample(range(self.layout.num_slots * 16), n), DEVICE)

    @property
    def k(self) -> torch.Tensor:
        return self.layout.k_view(self.arena, 1)

    @property
    def v(self) -> torch.Tensor:
        return self.layout.v_view(self.arena, 1)

    def run(self, **kw: Any) -> torch.Tensor:
        return rope_store_kv(self.qkv, self.cos, self.sin, self.k, self.v, self.rows, self.hq, **kw)

    def check(self, q: torch.Tensor, ulps: float) -> None:
        """q and the stored k within ``ulps`` roundings of fp32 rope; v stored exactly;
        every other element of the arena untouched."""
        n, heads, half = self.qkv.shape[0], self.hq + self.hkv, self.dim // 2
        x = self.qkv.float().unflatten(-1, (-1, self.dim))
        x1, x2 = x[:, :heads, :half], x[:, :heads, half:]
        dtype = self.qkv.dtype
        c, s = self.cos.to(dtype).float(), self.sin.to(dtype).float()  # fused.rotate's cast
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
        size = torch.cat((x1 * c, x2 * c), -1).abs() + torch.cat((x2 * s, x1 * s), -1).abs()
        hq, rows = self.hq, self.rows.long()
        assert q.shape == (n, hq, self.dim)
        _within(q, rot[:, :hq], size[:, :hq], ulps)
        _within(self.k[rows], rot[:, hq:], size[:, hq:], ulps)
        assert torch.equal(self.v[rows].float(), x[:, heads:])
        lay, restored = self.layout, self.arena.clone()
        lay.k_view(restored, 1)[rows] = lay.k_view(self.before, 1)[rows]
        lay.v_view(restored, 1)[rows] = lay.v_view(self.before, 1)[rows]
        assert torch.equal(restored, self.before)


def _within(out: torch.Tensor, ref: torch.Tensor, size: torch.Tensor, ulps: float) -> None:
    """``|out - ref| <= ulps · u · (|a·c| + |b·s|)``: one rounding of an fp32 sum is
    within ``u`` (the unit roundoff of ``out``'s dtype) of the terms' size; plus one
    subnormal step, where relative bounds stop (fp16 below 2^-14)."""
    err = (out.float() - ref).abs()
    unit = UNIT[out.dtype]
    excess = err - ulps * unit * size - torch.finfo(out.dtype).tiny * 2 * unit
    assert float(excess.max()) <= 1e-30, float(excess.max())


@pytest.mark.parametrize("hq,hkv,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_fp32_rope(hq: int, hkv: int, dim: int, dtype: torch.dtype) -> None:
    for n in (1, random.randint(2, 40)):
        step = Step(n, hq, hkv, dim, dtype)
        q = step.run(impl="triton")
        assert q.is_contiguous()
        step.check(q, ulps=_kernel_ulps(dtype))


def _kernel_ulps(dtype: torch.dtype) -> float:
    """One rounding to ``dtype`` plus slack for the fp32 arithmetic (for an fp32 result
    that arithmetic is the error: two products and a sum, each rounded)."""
    if dtype == torch.float32:
        return 3.01
    return 4.01 if INTERPRETED and dtype == torch.bfloat16 else 1.01


@pytest.mark.parametrize("hq,hkv,dim", SHAPES[:2])
def test_reference_path_matches_fp32_rope(hq: int, hkv: int, dim: int) -> None:
    """The CPU path (``impl="torch"``: eager rotate, three bf16 roundings) is within a
    few roundings of fp32, and is op for op the model's ``fused.rotate``."""
    from vtensor.models.fused import rotate

    step = Step(random.randint(1, 40), hq, hkv, dim, torch.bfloat16)
    step.check(step.run(impl="torch"), ulps=3.01)
    split = (hq + hkv) * dim
    # On the CPU (where the model runs ``rotate`` eagerly; CUDA compiles it: one rounding).
    x = step.qkv[:, :split].unflatten(-1, (hq + hkv, dim)).cpu()
    cos, sin = step.cos.cpu(), step.sin.cpu()
    assert torch.equal(rope_ref(x, cos, sin), rotate(x, cos, sin))


def test_out_buffer_strided_qkv_and_int64_rows() -> None:
    """q into the caller's buffer; qkv a column slice of a wider tensor (row stride >
    width, as a fused projection with extra columns would give); int64 rows."""
    step = Step(random.randint(2, 40), 8, 2, 64, torch.bfloat16)
    wide = torch.randn(step.qkv.shape[0], step.qkv.shape[1] + 48, device=DEVICE)
    wide = wide.to(torch.bfloat16)
    wide[:, : step.qkv.shape[1]] = step.qkv
    step.qkv, step.rows = wide[:, : step.qkv.shape[1]], step.rows.long()
    out = torch.full((step.qkv.shape[0], 8, 64), float("nan"), device=DEVICE).bfloat16()
    q = step.run(impl="triton", out=out)
    assert q.data_ptr() == out.data_ptr()
    step.check(q, ulps=_kernel_ulps(torch.bfloat16))


def test_kernel_and_reference_agree_and_empty_step() -> None:
    step = Step(random.randint(1, 40), 8, 2, 128, torch.float32)
    q = step.run(impl="triton")
    other = Step(1, 8, 2, 128, torch.float32)
    other.qkv, other.cos, other.sin, other.rows = step.qkv, step.cos, step.sin, step.rows
    other.arena, other.before = step.before.clone(), step.before
    assert torch.allclose(other.run(impl="torch"), q, rtol=1e-6, atol=1e-6)
    assert torch.allclose(other.arena, step.arena, rtol=1e-6, atol=1e-6)
    for impl in ("triton", "torch"):
        empty = Step(0, 4, 2, 64, torch.bfloat16)
        assert empty.run(impl=impl).shape == (0, 4, 64)
        assert torch.equal(empty.arena, empty.before)


def _bad(step: Step, **change: Any) -> dict[str, Any]:
    args = dict(qkv=step.qkv, cos=step.cos, sin=step.sin, k_cache=step.k, v_cache=step.v)
    args.update(rows=step.rows, q_heads=step.hq)
    args.update(change)
    return args


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_inputs_are_rejected_before_any_write(impl: str) -> None:
    step = Step(5, 4, 2, 64, torch.bfloat16)
    n, dev = 5, step.qkv.device
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        (dict(q_heads=3), ValueError, "multiple of kv_heads"),
        (dict(qkv=step.qkv[:, :-64]), ValueError, r"qkv must be \[T, 512\]"),
        (dict(qkv=step.qkv.unflatten(-1, (8, 64))), ValueError, "qkv must be"),
        (dict(qkv=step.qkv.t().contiguous().t()), ValueError, "unit column stride"),
        (dict(qkv=step.qkv.half()), TypeError, "must match"),
        (dict(cos=step.cos[:, :, :16]), ValueError, r"cos must be \[5, 1, 32\]"),
        (dict(sin=step.sin[:4]), ValueError, "sin must be"),
        (dict(cos=step.cos.double()), TypeError, "cos must be float32"),
        (dict(rows=step.rows[:4]), ValueError, "rows must be 1-D of length 5"),
        (dict(rows=step.rows.float()), TypeError, "rows must be int32 or int64"),
        (dict(v_cache=step.v[:, :1]), ValueError, "K/V caches must both be"),
        (dict(out=torch.empty(n, 4, 32, device=dev).bfloat16()), ValueError, "out must be"),
        (dict(out=torch.empty(n, 4, 64, device=dev)), ValueError, "out must be"),
        (
            dict(out=torch.empty(n, 64, 4, device=dev).bfloat16().transpose(1, 2)),
            ValueError,
            "unit last",
        ),
    ]
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            rope_store_kv(**_bad(step, **change), impl=impl)
        assert torch.equal(step.arena, step.before), change
    with pytest.raises(ValueError, match="impl must be"):
        rope_store_kv(**_bad(step), impl="cuda")
    assert torch.equal(step.arena, step.before)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_captured_in_a_cuda_graph_and_replayed_on_new_inputs() -> None:
    """Graph-safe: captured once (allocating only q, in the graph's pool), replayed with
    fresh qkv, angles and rows copied into the captured inputs, as decode steps do."""
    step = Step(16, 32, 8, 128, torch.bfloat16)  # Llama-3-8B's heads
    fresh = Step(16, 32, 8, 128, torch.bfloat16)
    step.run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = step.run()
    step.arena.copy_(step.before)  # capture launched nothing: the arena is as it was
    for name in ("qkv", "cos", "sin", "rows"):
        getattr(step, name).copy_(getattr(fresh, name))
    graph.replay()
    torch.cuda.synchronize()
    step.check(q, ulps=1.01)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (the compiled rotate)")
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8)])
def test_matches_the_compiled_rotate_and_store_kv(hq: int, hkv: int) -> None:
    """The path it replaces (``fused.rotate`` compiled by inductor on the strided qkv
    view, then ``store_kv``) gives q and k within one rounding of the same fp32 values
    each: the two differ by at most 2u of the terms' size; v is the same bits."""
    from vtensor.kernels import store_kv
    from vtensor.models.fused import rotate

    step = Step(random.randint(1, 40), hq, hkv, 128, torch.bfloat16)
    q = step.run()
    new_k, new_v = step.k[step.rows.long()].clone(), step.v[step.rows.long()].clone()
    split = (hq + hkv) * step.dim
    qk = rotate(step.qkv[:, :split].unflatten(-1, (hq + hkv, step.dim)), step.cos, step.sin)
    v = step.qkv[:, split:].unflatten(-1, (hkv, step.dim))
    store_kv(step.k, step.v, qk[:, hq:], v, step.rows)
    x = step.qkv.float().unflatten(-1, (-1, step.dim))[:, : hq + hkv]
    c, s = step.cos.bfloat16().float(), step.sin.bfloat16().float()
    half = step.dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    size = torch.cat((x1 * c, x2 * c), -1).abs() + torch.cat((x2 * s, x1 * s), -1).abs()
    _within(q, qk[:, :hq].float(), size[:, :hq], 2.02)
    _within(new_k, step.k[step.rows.long()].float(), size[:, hq:], 2.02)
    assert torch.equal(new_v, step.v[step.rows.long()])
