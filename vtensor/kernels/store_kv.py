"""store_kv: write new tokens' K and V for one layer at (slot, position) rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INDEX_POINTERS, check_index, check_kv_cache, next_pow2, use_triton
from .reference import store_kv_ref


@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def _store_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    Rows,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcr,
    stride_kch,
    stride_vcr,
    stride_vch,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # 64-bit offsets: row × cache row stride passes 2^31 elements on long contexts, and
    # t × input stride would on very large steps.
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(Rows + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    mask = (offs_h < H)[:, None]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KCache + row * stride_kcr + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VCache + row * stride_vcr + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    impl: str = "auto",
) -> None:
    """``k_cache[rows[i]] = k[i]`` (and V), for a layer view ``[rows, kv_heads, dim]``.

    ``rows[i] = slot * max_tokens + position``; rows must be distinct.
    """
    heads, dim = check_kv_cache(k_cache, v_cache)
    n = k.shape[0]
    if k.shape != (n, heads, dim) or v.shape != k.shape:
        raise ValueError(
            f"k/v must be [{n}, {heads}, {dim}], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k/v need a unit stride in head_dim")
    check_index(rows, "rows", n, k_cache.device)
    if n == 0:
        return
    if not use_triton(k_cache, k, impl=impl):
        store_kv_ref(k_cache, v_cache, k, v, rows)
        return
    _store_kv_kernel[(n,)](
        k,
        v,
        k_cache,
        v_cache,
        rows,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        H=heads,
        D=dim,
        BLOCK_H=next_pow2(heads),
    )
