"""Decode attention: one query token per request, split-K (flash-decoding), one kernel.

A program handles one (request, KV head, split) and *all* query heads of that KV
group, so each K/V row is read from HBM once (GQA/MQA). A request that uses one split
is written straight to the output; otherwise each split writes a partial output and a
log-sum-exp (``splitk.py``'s format) and the last split to finish merges them. There
is no second kernel: a separate merge cost 3.3 us a layer at batch 16 and 27 us at
batch 256 on the H100 (0.1 and 0.9 ms of a decode step), plus its launch gap.

The grid's split count (a host int, baked into a CUDA graph) comes from batch × KV
heads × ``max_len`` (``choose_num_splits``): the most splits any request may use.
How many a request does use is decided on the device (``splitk.split_range``), from
its own length and the batch's total: a decode graph captured with ``max_len =
max_model_len`` spreads a 2k-token request over many splits at batch 1, gives each
of 16 equal 1k-token requests one split (no partials, no merge), and still splits a
long request among short ones.

A whole-row variant (one program reading every KV head of a block of tokens,
for small ``batch × kv_heads``) was built and measured on the H100 under CUDA
graph replay: this per-KV-head kernel with per-request splits was faster at
18 of 23 points (benchmarks/results/kernels_decode_small_branch_h100_2026-11-21.txt),
so it was not kept.
"""

from __future__ import annotations

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
from .decode_config import DecodeConfig, choose_num_splits, default_config
from .reference import decode_ref
from .splitk import (
    BALANCE_WAVES,
    NO_BALANCE,
    DecodeWorkspace,
    batch_tokens,
    check_workspace,
    num_sms,
    publish_split,
    scratch,
    split_range,
)


@triton.jit
def _attend_split(
    q, K, V, kvh, row0, start, end, qk_scale, stride_kr, stride_kh, stride_vr, stride_vh,
    BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of the group's queries over rows ``row0 + [start, end)``: the
    unnormalised ``acc [BLOCK_G, D]``, the sums ``l`` and the base-2 maxima ``m``."""
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + kvh * stride_kh + offs_d[None, :]
    v_base = V + kvh * stride_vh + offs_d[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        rows = row0 + offs_n  # int64: row × stride passes 2^31 elements on long contexts
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
    return acc, l_i, m_i


@triton.jit(
    do_not_specialize=["batch", "balance_programs"],
    # Tickets too: with one split the wrapper passes the lengths (a slice of the step's
    # packed metadata, at any 4-byte offset) as its unused placeholder.
    do_not_specialize_on_alignment=[*INDEX_POINTERS, "Tickets"],
)
def _decode_split_kernel(
    Q, K, V, RowStart, Lens, Out, MidO, MidLse, Tickets,
    qk_scale, num_splits, batch, balance_programs, min_split,
    stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_ob, stride_oh,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Program ``(kvh, b, s)``: split ``s`` of request ``b`` for KV head ``kvh``'s query
    group. ``SPLIT`` (``num_splits > 1``) compiles the partials, the ticket and the merge
    (``splitk.py``); without it every request is one split, written straight to Out."""
    # b is widened so every per-request offset is 64-bit (batch × heads × D can pass 2^31).
    kvh = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    kv_heads = tl.num_programs(0)
    length = tl.load(Lens + b)
    total = batch_tokens(Lens, batch, 128) if SPLIT else length.to(tl.int64)
    start, end, used = split_range(
        length, total, s, num_splits, min_split, balance_programs, kv_heads, BLOCK_N
    )
    if s < used:  # splits past the request's end have nothing to do
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
        row0 = tl.load(RowStart + b).to(tl.int64)
        acc, l_i, m_i = _attend_split(
            q, K, V, kvh, row0, start, end, qk_scale,
            stride_kr, stride_kh, stride_vr, stride_vh, BLOCK_G, D, BLOCK_N, DOT_F32, PRECISION,
        )  # fmt: skip
        out = acc / l_i[:, None]  # l_i > 0: a used split holds ≥ 1 token
        out_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        if used == 1:
            tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=gmask[:, None])
        elif SPLIT:
            publish_split(
                out, m_i + tl.log2(l_i), out_ptrs, MidO, MidLse, Tickets + b * kv_heads + kvh,
                b, s, heads, gmask, used, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                BLOCK_G, D,
            )  # fmt: skip


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
    batch = q.shape[0]
    if max_len < 1:
        raise ValueError(f"max_len must be ≥ 1, got {max_len}")
    if batch > MAX_GRID_BATCH:
        raise ValueError(f"decode batch {batch} is over {MAX_GRID_BATCH}: the grid's y limit")
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
    _launch(q, k_cache, v_cache, row_starts, lengths, out, sm_scale, num_splits, cfg, workspace)
    return out


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor,
    sm_scale: float,
    num_splits: int,
    cfg: DecodeConfig,
    workspace: DecodeWorkspace | None,
) -> None:
    """The split kernel over grid ``(Hkv, B, num_splits)``: scratch only with splits."""
    (batch, q_heads, dim), kv_heads = q.shape, k_cache.shape[1]
    split = num_splits > 1
    if split:
        buf = scratch(workspace, batch, q_heads, num_splits, dim, q.device)
        mid_o, mid_lse, tickets = buf.mid_o, buf.mid_lse, buf.tickets
    else:  # one split: the kernel writes out itself and touches no scratch
        if workspace is not None:
            check_workspace(workspace, q_heads, dim, q.device)
        mid_o, mid_lse, tickets = out.unsqueeze(2), out, lengths  # placeholders, unused
    balance = BALANCE_WAVES * num_sms(q.device) if cfg.balance else NO_BALANCE
    # KV heads vary fastest, so one request's per-head programs start together and read
    # the same token rows (one 2 KiB row for Llama-3-8B) at about the same time: on the
    # H100, batch 256 at context 1024 read at 2.99 against 2.58 TB/s with batch fastest,
    # the same elsewhere (benchmarks/results/decode_grid_order_h100_2026-11-22.txt).
    _decode_split_kernel[(kv_heads, batch, num_splits)](
        q, k_cache, v_cache, row_starts, lengths, out, mid_o, mid_lse, tickets,
        sm_scale * LOG2E, num_splits, batch, balance, cfg.min_split,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        G=q_heads // kv_heads, BLOCK_G=max(16, next_pow2(q_heads // kv_heads)), D=dim,
        BLOCK_N=cfg.block_n, DOT_F32=dot_in_f32(), PRECISION=dot_precision(q.dtype), SPLIT=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


# The batch is the grid's y dimension, which CUDA bounds at 65,535.
MAX_GRID_BATCH = 65_535


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
