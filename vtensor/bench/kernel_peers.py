"""SGLang's Triton kernels as peers of ``vtensor bench kernels``, on a token pool of
their own that holds the same K/V (page size 1), and SGLang's split heuristic.

SGLang's decode is timed twice: with vtensor's split count (one number for the
batch, from ``choose_num_splits``), and with the split counts SGLang's own Triton
backend would choose (:func:`sglang_num_kv_splits`, per request, at most
``SGLANG_MAX_KV_SPLITS``). The second is how SGLang runs; the first isolates the
kernels from the heuristics. Both counts are computed outside the timed region,
as ours is (SGLang computes its counts with a small kernel of its own per step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vtensor.kernels.decode import choose_num_splits, num_sms

# SGLang's ``ServerArgs.triton_attention_num_kv_splits`` default (16 on ROCm), which its
# Triton backend uses as ``max_kv_splits`` when neither static splits nor the
# deterministic mode is asked for.
SGLANG_MAX_KV_SPLITS = 8


def sglang_num_kv_splits(
    seq_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    core_count: int,
    max_kv_splits: int = SGLANG_MAX_KV_SPLITS,
) -> list[int]:
    """Split count per request by the rule of SGLang's Triton backend (sglang 0.5.5,
    ``get_num_kv_splits``, decode without speculation), restated in Python.

    The rule takes the larger of two counts per request: one that evens out lengths
    across the batch (the longest request split into about longest/shortest parts,
    unless all lengths are within 25%), and one that fills the GPU's cores (scaled
    by ``log2(longest / 64)``) over the grid of (request, head block) programs.
    Both cap at ``max_kv_splits``. SGLang evaluates ``log2`` in float32 on the
    device; this uses float64, which can differ only where the scaled core count
    lands within rounding of an integer.
    """
    longest, shortest = max(seq_lens), min(seq_lens)
    if longest * 8 < shortest * 10:  # lengths within 25%: no evening out
        shortest = longest
    even_split_len = _cdiv(longest, min(_cdiv(longest, shortest), max_kv_splits))
    cores = int(core_count * max(math.log2(longest / 64.0), 1.0))
    group = num_heads // num_kv_heads
    # Programs per request: one per head (MHA) or per block of up to 16 query heads.
    per_request = num_heads if group == 1 else _cdiv(num_heads, min(16, group))
    fill = min(_cdiv(cores, len(seq_lens) * per_request), max_kv_splits)
    fill_split_len = _cdiv(longest, fill)
    return [max(_cdiv(n, even_split_len), _cdiv(n, fill_split_len)) for n in seq_lens]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sglang_pools(
    kvs: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One token pool per layer view in ``kvs``: a contiguous copy of rows ``rows``
    (``[batch, ctx]``), as SGLang keeps one pool per layer. A point fills only as many
    layers as graph timing rotates over, so the copies stay under about 256 MiB plus
    one layer's K/V (``kernel_timing.rotation``)."""
    flat = rows.reshape(-1)
    return [(k[flat].contiguous(), v[flat].contiguous()) for k, v in kvs]


def sglang_decode_calls(
    sgl: Any,
    q: torch.Tensor,
    pools: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ctx: int,
    own_splits: bool,
) -> tuple[list[Callable[[], torch.Tensor]], list[int]]:
    """SGLang's decode over each pool of :func:`sglang_pools` (one call per pool, for
    graph timing), with its split buffers allocated once, as SGLang runs it. Each call
    returns the output. Returns (calls, split counts used)."""
    batch, q_heads, dim = q.shape
    kv_heads = pools[0][0].shape[1]
    indptr = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * ctx
    indices = torch.arange(batch * ctx, device=q.device, dtype=torch.int64)
    cores = num_sms(q.device)
    if own_splits:
        splits = sglang_num_kv_splits([ctx] * batch, q_heads, kv_heads, cores)
        max_splits = SGLANG_MAX_KV_SPLITS
    else:
        splits = [choose_num_splits(batch, kv_heads, ctx, cores)] * batch
        max_splits = splits[0]
    o = torch.empty_like(q)
    logits = torch.empty(batch, q_heads, max_splits, dim, device=q.device)
    lse = torch.empty(batch, q_heads, max_splits, device=q.device)
    nsplit = torch.tensor(splits, device=q.device, dtype=torch.int32)
    fn, scale = sgl.decode_attention_fwd, dim**-0.5

    def call(k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        fn(q, k_pool, v_pool, o, indptr, indices, logits, lse, nsplit, max_splits, scale)
        return o

    return [functools.partial(call, kp, vp) for kp, vp in pools], splits


def sglang_extend_ms(
    sgl: Any,
    q: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    prefix: int,
    bench: Callable[[Callable[[], object]], float],
) -> float:
    """SGLang's extend: the prefix K/V in a token pool (indexed), the new K/V
    contiguous; ``rows`` ([batch, prefix + new]) are each request's rows in ``kv``."""
    batch, seq = rows.shape
    new = seq - prefix
    k, v = kv
    pre, ext = rows[:, :prefix].reshape(-1), rows[:, prefix:].reshape(-1)
    k_pool, v_pool = k[pre].contiguous(), v[pre].contiguous()
    k_ext, v_ext = k[ext].contiguous(), v[ext].contiguous()
    if prefix == 0:  # an empty pool still needs a valid pointer
        k_pool = v_pool = torch.zeros(1, *k.shape[1:], device=q.device, dtype=k.dtype)
    qo = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * new
    kv_indptr = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * prefix
    kv_indices = torch.arange(max(1, batch * prefix), device=q.device, dtype=torch.int64)
    o = torch.empty_like(q)
    fn = sgl.extend_attention_fwd
    return bench(
        lambda: fn(
            q, k_ext, v_ext, o, k_pool, v_pool, qo, kv_indptr, kv_indices, None, True, None, new
        )
    )


def request_rows(starts: torch.Tensor, length: int) -> torch.Tensor:
    """``[batch, length]`` cache rows: ``starts[b] + 0 .. length-1``."""
    return starts.to(torch.int64)[:, None] + torch.arange(length, device=starts.device)
