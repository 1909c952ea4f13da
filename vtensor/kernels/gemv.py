"""Small-batch GEMV: ``y[M, N] = x[M, K] @ W[N, K]^T`` for ``M ≤ 16``, bandwidth-bound.

A decode step at small batch reads every weight once and does ~M multiply-adds a
weight element: it runs at the speed W streams from HBM. Each program owns
``BLOCK_N`` rows of W and streams them over (its share of) K in wide vectorized
loads, against the M rows of x (tiny, L1/L2 resident); fp32 accumulation, output
in x's dtype. How the tile products are formed, the block sizes and the split-K
come from ``gemv_config.py`` (an explicit table; overridable).

**Graph-safe**: the only allocation is the output, plus, for a split-K launch, an
fp32 partial-sum buffer cached by (device, split, M, N) and never freed or
reallocated: a captured graph keeps its address. Calls on one device run in stream
order (the engine's one compute stream), so every layer of a shape shares it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import dot_in_f32, use_triton
from .gemv_config import DISPATCH_MAX_M, MAX_M, GemvConfig, choose_config


@triton.jit
def _bcast_tile_sum(
    X, W, M, N, K, stride_xm, stride_wn, k_start, k_end,
    offs_m, offs_n, offs_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DEFERRED: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_M, BLOCK_N]`` fp32 sums over ``[k_start, k_end)`` by broadcasting.

    Both tiles are loaded as 3-D (x ``[BLOCK_M, 1, BLOCK_K]``, W ``[1, BLOCK_N,
    BLOCK_K]``), not expanded from 2-D: with K the fastest dim of both, Triton gives
    them one layout and the broadcast product stays in registers."""
    x_ptrs = X + offs_m[:, None, None] * stride_xm + offs_k[None, None, :]
    w_ptrs = W + offs_n[None, :, None] * stride_wn + offs_k[None, None, :]
    m_ok = offs_m[:, None, None] < M
    n_ok = offs_n[None, :, None] < N
    if DEFERRED:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        if EVEN:  # no tails in N or K: unmasked (fully vectorized) weight loads
            w = tl.load(w_ptrs + k0)
            x = tl.load(x_ptrs + k0, mask=m_ok, other=0.0)
        else:
            k_ok = (k0 + offs_k)[None, None, :] < k_end
            w = tl.load(w_ptrs + k0, mask=n_ok & k_ok, other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_ok & k_ok, other=0.0)
        prod = x.to(tl.float32) * w.to(tl.float32)
        if DEFERRED:
            acc3 += prod
        else:
            acc += tl.sum(prod, axis=2)
    if DEFERRED:
        acc = tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _dot_tile_sum(
    X, W, M, N, K, stride_xm, stride_wn, k_start, k_end,
    offs_m, offs_n, offs_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_M (16), BLOCK_N]`` fp32 sums over ``[k_start, k_end)`` with ``tl.dot``
    (x's rows past M load as zeros)."""
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        if EVEN:
            w = tl.load(w_ptrs + k0)
            x = tl.load(x_ptrs + k0, mask=m_ok, other=0.0)
        else:
            k_ok = (k0 + offs_k)[None, :] < k_end
            w = tl.load(w_ptrs + k0, mask=n_ok & k_ok, other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_ok & k_ok, other=0.0)
        if DOT_F32:  # the CPU interpreter's bf16 dot is wrong (common.dot_in_f32)
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


# M is not specialized on (Triton would compile M == 1 apart): every M of a block_m
# bucket shares one variant, so the CUDA-graph warm-ups at batch 1, 2, 4 and 8 compile
# all that an eager step of 1..8 rows needs (no compile mid-serving).
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    X, W, Out, M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program ``(i, s)``: rows ``[i·BLOCK_N, (i+1)·BLOCK_N)`` of W over split ``s`` of K.
    ``Out`` is y (one split) or the fp32 partials ``[split, M, N]`` (row stride
    ``stride_om``, split stride ``stride_os``). MODE: 0 step, 1 deferred, 2 dot."""
    # 64-bit offsets: row × K passes 2^31 elements for a large enough W.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if MODE == 2:
        acc = _dot_tile_sum(
            X, W, M, N, K, stride_xm, stride_wn, k_start, k_end, offs_m, offs_n, offs_k,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN, DOT_F32, STAGES,
        )  # fmt: skip
    else:
        acc = _bcast_tile_sum(
            X, W, M, N, K, stride_xm, stride_wn, k_start, k_end, offs_m, offs_n, offs_k,
            BLOCK_M, BLOCK_N, BLOCK_K, MODE == 1, EVEN, STAGES,
        )  # fmt: skip
    out = Out + split.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["total"])
def _split_sum_kernel(Partial, Y, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """``Y.flat[i] = Σ_s Partial[s].flat[i]`` (fixed order: deterministic), cast to Y."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(Partial + s * total.to(tl.int64) + offs, mask=mask, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


GEMV_DTYPES = (torch.bfloat16, torch.float16)
_MODE_IDS = {"step": 0, "deferred": 1, "dot": 2}
_partials: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small grids, so tests reach split-K


def check_gemv_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    """``x [M, K]`` (unit stride in K), ``W [N, K]`` contiguous, ``1 ≤ M ≤ 16``, one
    dtype (bf16/fp16), one device; a clear error otherwise."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"gemv needs x [M, K] and weight [N, K], got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={weight.shape[1]}")
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"gemv serves 1..{MAX_M} rows of x, got {x.shape[0]}")
    if x.dtype != weight.dtype or x.dtype not in GEMV_DTYPES:
        raise TypeError(f"x and weight must share one of {GEMV_DTYPES}: {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("gemv needs x with unit stride in K and a contiguous weight")
    if not use_triton(x, impl="auto"):
        raise ValueError("gemv runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)")


def _partial_buffer(device: torch.device, split: int, m: int, n: int) -> torch.Tensor:
    """The cached fp32 ``[split, m, n]`` partial sums. A first use allocates (under a
    graph capture too: from the graph's pool, kept alive here, so its address holds)."""
    key = (device, split, m, n)
    buf = _partials.get(key)
    if buf is None:
        buf = torch.empty((split, m, n), dtype=torch.float32, device=device)
        _partials[key] = buf
    return buf


def should_use_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether :func:`gemv` serves ``F.linear(x, weight, bias)``: CUDA tensors on one
    device, ``x [1..16, K]`` with unit K stride, a contiguous ``W [N, K]``, one bf16/fp16
    dtype, no bias, and at most ``DISPATCH_MAX_M`` rows: where it measured faster than
    cuBLAS. (On the CPU, the interpreter would be slower than torch.)"""
    return (
        bias is None
        and x.is_cuda
        and x.dim() == 2
        and 1 <= x.shape[0] <= DISPATCH_MAX_M
        and x.dtype in GEMV_DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and weight.device == x.device
        and x.stride(1) == 1
        and weight.is_contiguous()
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None, check: bool = True
) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without bias) for ``x [M ≤ 16, K]``, in x's dtype.

    ``config`` overrides the table's choice (:func:`gemv_config.choose_config`);
    ``check=False`` skips the argument checks for a caller that ran
    :func:`should_use_gemv` (the model's linear layers: host time per call)."""
    if check:
        check_gemv_args(x, weight)
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0 or k == 0:  # an empty sum is 0, as F.linear gives
        return y.zero_()
    cfg = config or choose_config(m, n, k, _num_sms(x.device))
    _launch(x, weight, y, cfg)
    return y


def _launch(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cfg: GemvConfig) -> None:
    (m, k), n = x.shape, weight.shape[0]
    # k_per_split: a whole number of K blocks, so only a split's last block has a tail.
    k_per_split = -(-k // (cfg.split_k * cfg.block_k)) * cfg.block_k
    even = k % k_per_split == 0 and n % cfg.block_n == 0
    if cfg.split_k == 1:
        out, stride_os = y, 0
    else:
        out = _partial_buffer(x.device, cfg.split_k, m, n)
        stride_os = out.stride(0)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    _gemv_kernel[grid](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), n, stride_os, k_per_split,
        BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        MODE=_MODE_IDS[cfg.mode], EVEN=even, DOT_F32=dot_in_f32(), STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.split_k > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            out, y, m * n, SPLIT=cfg.split_k, BLOCK=block
        )
