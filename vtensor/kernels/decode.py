"""Decode attention: one query token per request, split-K (flash-decoding).

Stage 1 splits each request's context into ``num_splits`` ranges; a program
handles one (request, KV head, split) and *all* query heads of that KV group,
so each K/V row is read from HBM once (GQA/MQA). It writes a partial output
and a log-sum-exp per query head (``splitk.py``'s format). Stage 2 merges the
splits. With one split (large batches: enough programs without splitting) stage 1
writes the final output itself and no merge runs: at batch 256 on the H100 the merge
cost 27 us a layer, 0.9 ms of a 22 ms step.

The grid's split count (a host int, baked into a CUDA graph) comes from batch
× KV heads × ``max_len`` so that the GPU has enough programs at batch 1 with
long contexts and does not over-split at large batches
(``choose_num_splits``). Each request then divides its *own* length among
those splits on the device (``splitk.split_range``): a decode graph captured
with ``max_len = max_model_len`` spreads a 2k-token request over every split
rather than leaving it to the first one.

A whole-row variant (one program reading every KV head of a block of tokens,
for small ``batch × kv_heads``) was built and measured on the H100 under CUDA
graph replay: this per-KV-head kernel with per-request splits was faster at
18 of 23 points (benchmarks/results/kernels_decode_small_branch_h100_2026-11-21.txt),
so it was not kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    INDEX_POINTERS,
    LOG2E,
    check_decode_args,
    check_out,
    dot_in_f32,
    dot_precision,
    next_pow2,
    resolve_scale,
    use_triton,
)
from .reference import decode_ref
from .splitk import (
    WAVES,
    DecodeWorkspace,
    check_workspace,
    merge_splits,
    num_sms,
    scratch,
    split_range,
)


@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def _decode_split_kernel(
    Q,
    K,
    V,
    RowStart,
    Lens,
    MidO,
    MidLse,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    min_split,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # DIRECT (one split): ``MidO`` is the output itself (its strides, split stride 0) and
    # the normalised result is final: no log-sum-exp, no merge launch.
    # 64-bit offsets: cache rows (row0 + position) times the row stride pass 2^31
    # elements on long contexts; b is widened so every per-request offset is too.
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    start, end, used = split_range(tl.load(Lens + b), s, num_splits, min_split, BLOCK_N)
    row0 = tl.load(RowStart + b).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    gmask = offs_g < G
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + kvh * stride_kh + offs_d[None, :]
    v_base = V + kvh * stride_vh + offs_d[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        rows = row0 + offs_n
        k = tl.load(k_base + rows[:, None] * stride_kr, mask=nmask[:, None], other=0.0)
        if DOT_F32:  # interpreter only: its bf16 dot is wrong (see common.dot_in_f32)
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # base-2 logits
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vr, mask=nmask[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # Splits past the request's end (s ≥ used) ran no iteration and are never merged: no
    # store. (A bound, not `gmask & (s < used)`: the interpreter's tensor & scalar is int.)
    gmask = offs_g < tl.where(s < used, G, 0)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))
    tl.store(
        MidO + b * stride_mb + heads[:, None] * stride_mh + s * stride_ms + offs_d[None, :],
        out.to(MidO.dtype.element_ty),
        mask=gmask[:, None],
    )
    if not DIRECT:
        tl.store(MidLse + b * stride_lb + heads * stride_lh + s, lse, mask=gmask)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (defaults tuned on the H100)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Fewest tokens a request puts in one split (rounded up to block_n): a short request
    # uses fewer splits rather than many nearly empty ones.
    min_split: int = 64

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps < 1 or self.num_stages < 1 or self.min_split < 1:
            raise ValueError(f"num_warps, num_stages and min_split must be >= 1: {self}")

    @property
    def name(self) -> str:
        return f"n{self.block_n}-w{self.num_warps}-s{self.num_stages}-m{self.min_split}"


# (request, KV head) pairs from which two pipeline stages beat three: on the H100 (graph
# replay, Llama-3-8B decode, kernels_decode_waves_h100_2026-11-22.txt) 2 stages were
# 1-6% faster at batch 4-64 and 1-3% slower at batch 1, where each program streams a
# long run of its request alone and deeper prefetch pays.
DEEP_PIPELINE_BELOW_PAIRS = 32


def default_config(dim: int, batch: int, kv_heads: int) -> DecodeConfig:
    """The launch parameters ``decode_attention`` uses when the caller gives none."""
    stages = 3 if batch * kv_heads < DEEP_PIPELINE_BELOW_PAIRS else 2
    return DecodeConfig(block_n=64 if dim <= 128 else 32, num_stages=stages)


def choose_num_splits(
    batch: int,
    kv_heads: int,
    max_len: int,
    num_sms: int,
    min_tokens_per_split: int = 256,
    max_splits: int = 64,
    waves: int = WAVES,
) -> int:
    """Splits per request: enough programs for ~``waves`` waves (``WAVES``), each split
    ≥ ``min_tokens``. (More than ``MAX_WAVES`` needs a workspace sized for them:
    ``DecodeWorkspace.for_batch`` covers ``MAX_WAVES``; the kernel bench sweeps it.)"""
    want = math.ceil(waves * num_sms / max(1, batch * kv_heads))
    by_len = max(1, math.ceil(max_len / min_tokens_per_split))
    return max(1, min(want, by_len, max_splits))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    impl: str = "auto",
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over each request's cached rows.

    Request ``b`` reads rows ``row_starts[b] .. row_starts[b] + lengths[b] - 1``
    of the layer views ``k_cache``/``v_cache`` (``[rows, Hkv, D]``, any row and
    head strides). ``max_len`` (host int) bounds ``lengths`` and sizes the grid's
    split count. Lengths must be ≥ 1. Returns ``[B, Hq, D]`` in ``q``'s dtype.
    ``workspace`` holds the split-K scratch (the engine passes one, so a CUDA graph
    reuses the same buffers); without it the scratch is allocated per call.
    """
    kv_heads, dim = check_decode_args(q, k_cache, v_cache, row_starts, lengths)
    batch, q_heads = q.shape[:2]
    if max_len < 1:
        raise ValueError(f"max_len must be ≥ 1, got {max_len}")
    sm_scale = resolve_scale(sm_scale, dim)
    if not use_triton(q, k_cache, impl=impl):
        ref = decode_ref(q, k_cache, v_cache, row_starts, lengths, sm_scale)
        return check_out(out, q).copy_(ref)
    cfg = config or default_config(dim, batch, kv_heads)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_len, num_sms(q.device))
    # No split can hold fewer than min_split tokens, so more than this many never run.
    num_splits = max(1, min(num_splits, triton.cdiv(max_len, cfg.min_split)))
    out = check_out(out, q)
    direct = num_splits == 1  # one split's normalised output is final: no merge
    if direct:
        if workspace is not None:
            check_workspace(workspace, q_heads, dim, q.device)
        mid_o, mid_lse = out.unsqueeze(2), out  # mid_lse: unused (never stored)
    else:
        mid_o, mid_lse = scratch(workspace, batch, q_heads, num_splits, dim, q.device)
    group = q_heads // kv_heads
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, row_starts, lengths, mid_o, mid_lse,
        sm_scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        cfg.min_split,
        G=group, BLOCK_G=max(16, next_pow2(group)), D=dim, BLOCK_N=cfg.block_n,
        DOT_F32=dot_in_f32(), PRECISION=dot_precision(q.dtype), DIRECT=direct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not direct:
        merge_splits(mid_o, mid_lse, out, lengths, cfg.min_split, cfg.block_n)
    return out


# Split counts whose kernel variants differ: Triton specializes integer arguments (the
# split count and the strides it sets) on being 1 or a multiple of 16. One of each class
# covers every variant.
PRECOMPILE_SPLITS = (1, 2, 16, 17, 32, 48, 64)


def precompile_decode(
    q_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row: int = 0,
    impl: str = "auto",
    workspace: DecodeWorkspace | None = None,
) -> int:
    """Compile the decode kernels' variants now, rather than mid-serving: a new batch
    shape can pick a split count whose variant is not compiled yet, and the compile
    (about a second) then stalls a step. Reads one cache row, ``row``, which must be
    mapped. Returns the number of variants run (0 where Triton is not used)."""
    dim = k_cache.shape[-1]
    q = torch.zeros(1, q_heads, dim, dtype=k_cache.dtype, device=k_cache.device)
    if not use_triton(q, k_cache, impl=impl):
        return 0
    rows = torch.tensor([row], dtype=torch.int32, device=q.device)
    lens = torch.ones(1, dtype=torch.int32, device=q.device)
    for splits in PRECOMPILE_SPLITS:
        decode_attention(
            q, k_cache, v_cache, rows, lens, splits * 64, num_splits=splits, impl=impl,
            workspace=workspace,
        )  # fmt: skip
    return len(PRECOMPILE_SPLITS)
