"""Extend (prefix-prefill) attention over the strided KV layout.

Request ``b`` has ``p_b`` cached prefix tokens and ``n_b`` new tokens whose
K/V were just stored behind the prefix (rows ``row_starts[b] + [0, p_b + n_b)``).
New query ``i`` sits at position ``p_b + i`` and attends to every prefix token
and causally to the new ones. Variable lengths share one launch; ``p_b = 0``
is plain prefill. Programs: (query block, request, query head). Key blocks
below the diagonal run unmasked-by-causality; only the diagonal band masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INDEX_POINTERS,
    LOG2E,
    check_extend_args,
    check_out,
    dot_in_f32,
    dot_precision,
    resolve_scale,
    use_triton,
)
from .reference import extend_ref


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    offs_n,
    lo,
    hi,
    qpos,
    stride_kr,
    stride_vr,
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        kpos = n0 + offs_n
        valid = kpos < hi
        # 64-bit offsets: position × token stride passes 2^31 elements on long contexts
        # (a Llama-3-8B row is 65,536 elements apart, so past 32,767 tokens). The block's
        # first row is one 64-bit scalar product; rows inside the block stay 32-bit unless
        # the block itself spans 2^31 elements (WIDE_ROWS, set by the wrapper).
        if WIDE_ROWS:
            k_blk = k_ptrs + kpos.to(tl.int64)[:, None] * stride_kr
            v_blk = v_ptrs + kpos.to(tl.int64)[:, None] * stride_vr
        else:
            first = tl.cast(n0, tl.int64)  # n0 is a plain int in the interpreter
            k_blk = k_ptrs + first * stride_kr + (offs_n * stride_kr)[:, None]
            v_blk = v_ptrs + first * stride_vr + (offs_n * stride_vr)[:, None]
        k = tl.load(k_blk, mask=valid[:, None], other=0.0)
        if DOT_F32:  # interpreter only: its bf16 dot is wrong (see common.dot_in_f32)
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CAUSAL:  # noqa: SIM108 - a constexpr branch, resolved at compile time
            valid = valid[None, :] & (kpos[None, :] <= qpos[:, None])
        else:
            valid = valid[None, :]
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_blk, mask=(kpos < hi)[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    QoIndptr,
    RowStart,
    PrefixLens,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
):
    mblk = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(QoIndptr + b)
    n = tl.load(QoIndptr + b + 1) - q0
    p = tl.load(PrefixLens + b)
    row0 = tl.load(RowStart + b).to(tl.int64)
    kvh = h // G
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mmask = offs_m < n
    q = tl.load(
        Q + (q0 + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mmask[:, None],
        other=0.0,
    )
    live = mblk * BLOCK_M < n  # blocks past this request's queries do nothing
    full_hi = tl.where(live, p + mblk * BLOCK_M, 0)  # keys every query here may see
    diag_hi = tl.where(live, p + tl.minimum(n, (mblk + 1) * BLOCK_M), 0)
    k_ptrs = K + row0 * stride_kr + kvh * stride_kh + offs_d[None, :]
    v_ptrs = V + row0 * stride_vr + kvh * stride_vh + offs_d[None, :]
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    qpos = p + offs_m
    acc, m_i, l_i = _attend_block(
        acc,
        m_i,
        l_i,
        q,
        k_ptrs,
        v_ptrs,
        offs_n,
        0,
        full_hi,
        qpos,
        stride_kr,
        stride_vr,
        qk_scale,
        False,
        BLOCK_N,
        DOT_F32,
        PRECISION,
        WIDE_ROWS,
    )
    acc, m_i, l_i = _attend_block(
        acc,
        m_i,
        l_i,
        q,
        k_ptrs,
        v_ptrs,
        offs_n,
        full_hi,
        diag_hi,
        qpos,
        stride_kr,
        stride_vr,
        qk_scale,
        True,
        BLOCK_N,
        DOT_F32,
        PRECISION,
        WIDE_ROWS,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + (q0 + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mmask[:, None],
    )


def _config(dim: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim."""
    if not on_gpu:
        return 16, 16, 4, 1  # interpreter: small blocks keep tests fast
    if dim <= 64:
        return 128, 64, 4, 3
    if dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    row_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_new: int,
    sm_scale: float | None = None,
    impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefix-prefill attention for packed new queries ``q [T, Hq, D]``.

    ``qo_indptr [B+1]`` delimits each request's new tokens in ``q``;
    ``row_starts [B]`` is each request's first cache row; ``prefix_lens [B]``
    its cached prefix. The new tokens' K/V must already be in the cache.
    ``max_new`` (host int) bounds the new tokens per request.
    """
    kv_heads, dim = check_extend_args(q, k_cache, v_cache, qo_indptr, row_starts, prefix_lens)
    batch = row_starts.shape[0]
    sm_scale = resolve_scale(sm_scale, dim)
    if not use_triton(q, k_cache, impl=impl):
        ref = extend_ref(q, k_cache, v_cache, qo_indptr, row_starts, prefix_lens, sm_scale)
        return check_out(out, q).copy_(ref)
    out = check_out(out, q)
    if batch == 0 or max_new <= 0:
        return out
    block_m, block_n, warps, stages = _config(dim, q.is_cuda)
    grid = (triton.cdiv(max_new, block_m), batch, q.shape[1])
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        qo_indptr,
        row_starts,
        prefix_lens,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        G=q.shape[1] // kv_heads,
        D=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_F32=dot_in_f32(),
        PRECISION=dot_precision(q.dtype),
        WIDE_ROWS=block_n * max(k_cache.stride(0), v_cache.stride(0)) >= 2**31,
        num_warps=warps,
        num_stages=stages,
    )
    return out
