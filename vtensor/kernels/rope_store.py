"""rope_store_kv: rotary embedding fused with the K/V store, one kernel per layer.

Reads a step's ``qkv`` (the QKV projection's output, ``[T, (Hq + 2·Hkv)·D]``)
once: rotates the q and k heads, writes q to a contiguous ``[T, Hq, D]`` output
and the rotated k and the plain v straight into the layer's cache rows. It
replaces the compiled ``rotate`` (which on the strided qkv view ran far from
bandwidth: 22.8 us per layer at batch 256 on an H100) plus ``store_kv``.

Numerics are ``models.fused.rotate``'s as the GPU compiles it: HF's
``rotate_half`` pairs (element ``i`` with ``i + D/2``), cos/sin first cast to the
activation dtype, the products and their sum in fp32, one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INDEX_POINTERS, check_index, check_kv_cache, next_pow2, use_triton
from .reference import rope_store_kv_ref

# Elements one program moves: 16 heads of 128 (about 4 KB of bf16 in, 4 KB out).
# Small enough that batch 1 still spreads a token's 48 heads over a few programs,
# large enough that batch 256 is not thousands of tiny programs.
ELEMENTS_PER_PROGRAM = 2048


@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def _rope_store_kernel(
    QKV,
    Cos,
    Sin,
    Out,
    KCache,
    VCache,
    Rows,
    stride_xt,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    stride_kcr,
    stride_kch,
    stride_vcr,
    stride_vch,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Program (t, block): heads [block·BLOCK_H, +BLOCK_H) of token t, counted over
    # q heads, then k heads, then v heads (qkv's column order). 64-bit offsets: a
    # cache row × row stride passes 2^31 elements on long contexts (issue 11).
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    live = (h < HQ + 2 * HKV)[:, None]
    x = QKV + t * stride_xt + h[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(x, mask=live, other=0.0)
    x2 = tl.load(x + HALF, mask=live, other=0.0)
    # cos/sin rounded to the activation dtype first (fused.rotate's cast), then fp32.
    c = tl.load(Cos + t * stride_ct + d).to(QKV.dtype.element_ty).to(tl.float32)[None, :]
    s = tl.load(Sin + t * stride_st + d).to(QKV.dtype.element_ty).to(tl.float32)[None, :]
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    rotate = (h < HQ + HKV)[:, None]  # v heads pass through unrotated
    y1 = tl.where(rotate, f1 * c - f2 * s, f1)
    y2 = tl.where(rotate, f2 * c + f1 * s, f2)
    y1, y2 = y1.to(QKV.dtype.element_ty), y2.to(QKV.dtype.element_ty)  # the one rounding
    is_q = (h < HQ)[:, None]
    o = Out + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    _store_halves(o, y1, y2, is_q, HALF)
    row = tl.load(Rows + t).to(tl.int64)
    is_k = (h >= HQ)[:, None] & rotate
    kc = KCache + row * stride_kcr + (h - HQ)[:, None] * stride_kch + d[None, :]
    _store_halves(kc, y1, y2, is_k, HALF)
    is_v = live & (h >= HQ + HKV)[:, None]
    vc = VCache + row * stride_vcr + (h - HQ - HKV)[:, None] * stride_vch + d[None, :]
    _store_halves(vc, y1, y2, is_v, HALF)


@triton.jit
def _store_halves(ptr, y1, y2, mask, HALF: tl.constexpr):
    """A head's two halves (the rotate_half pairs) at ``ptr`` and ``ptr + HALF``."""
    tl.store(ptr, y1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, y2.to(ptr.dtype.element_ty), mask=mask)


def rope_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    q_heads: int,
    impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate ``qkv``'s q and k heads; store k and v at ``rows``; return q ``[T, Hq, D]``.

    ``qkv [T, (q_heads + 2·kv_heads)·D]`` holds each token's q heads, k heads, then
    v heads (unit column stride; any row stride); ``cos``/``sin`` are the step's
    ``[T, 1, D/2]`` angles (``RopeAngles``); the cache views are ``[rows, kv_heads,
    D]`` (``kv_heads`` and ``D`` come from them). ``rows`` must be distinct. q goes
    to ``out`` if given (``[T, q_heads, D]``, unit last stride), else a new tensor:
    the only allocation, and no host sync, so a CUDA graph can capture it.
    """
    kv_heads, dim = check_kv_cache(k_cache, v_cache)
    n = _check_inputs(qkv, cos, sin, k_cache, q_heads, kv_heads, dim)
    check_index(rows, "rows", n, k_cache.device)
    out = _check_q_out(out, qkv, q_heads, dim)
    if not use_triton(k_cache, qkv, impl=impl):
        return rope_store_kv_ref(qkv, cos, sin, k_cache, v_cache, rows, q_heads, out)
    if n == 0:
        return out
    heads = q_heads + 2 * kv_heads
    block_h = min(next_pow2(heads), max(1, ELEMENTS_PER_PROGRAM // dim))
    _rope_store_kernel[(n, triton.cdiv(heads, block_h))](
        qkv, cos, sin, out, k_cache, v_cache, rows,
        qkv.stride(0), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HQ=q_heads, HKV=kv_heads, HALF=dim // 2, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def _check_inputs(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    dim: int,
) -> int:
    """Validate qkv and the angles against the cache; returns the token count ``T``."""
    if q_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads must be a positive multiple of kv_heads={kv_heads}")
    width = (q_heads + 2 * kv_heads) * dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [T, {width}] ((q_heads + 2·kv_heads)·head_dim), got {tuple(qkv.shape)}"
        )
    if qkv.stride(1) != 1:
        raise ValueError("qkv needs a unit column stride")
    if qkv.dtype != k_cache.dtype:
        raise TypeError(f"qkv is {qkv.dtype}, the K/V cache {k_cache.dtype}: they must match")
    n = qkv.shape[0]
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape != (n, 1, dim // 2) or a.stride(-1) != 1:
            raise ValueError(
                f"{name} must be [{n}, 1, {dim // 2}] with a unit last stride, got {tuple(a.shape)}"
            )
        if a.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the rope tables), got {a.dtype}")
    for name, a in (("qkv", qkv), ("cos", cos), ("sin", sin)):
        if a.device != k_cache.device:
            raise ValueError(f"{name} is on {a.device}, the K/V cache on {k_cache.device}")
    return n


def _check_q_out(
    out: torch.Tensor | None, qkv: torch.Tensor, q_heads: int, dim: int
) -> torch.Tensor:
    """The caller's q buffer, checked, or a new contiguous one."""
    shape = (qkv.shape[0], q_heads, dim)
    if out is None:
        return torch.empty(shape, dtype=qkv.dtype, device=qkv.device)
    if out.shape != shape or out.dtype != qkv.dtype or out.device != qkv.device:
        raise ValueError(f"out must be {shape} {qkv.dtype} on {qkv.device}")
    if out.stride(-1) != 1:
        raise ValueError("out needs a unit last stride")
    return out
