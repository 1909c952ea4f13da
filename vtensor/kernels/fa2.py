"""Adapter: torch's built-in FlashAttention-2 varlen kernel on our KV arena.

It shows the decoupling claim: an unmodified off-the-shelf kernel reads the
virtual KV layout directly. Per request, ``cum_seq_k[b] = row_start`` (slot *
max_tokens) and ``seqused_k[b]`` = its length; FA2 needs only a unit stride in
``head_dim``, so the strided layer views pass as they are. With unequal q/k
lengths FA2 aligns the causal mask bottom-right, which is exactly extend.
CUDA only (torch has no CPU FlashAttention).
"""

from __future__ import annotations

import torch

from .common import check_decode_args, check_extend_args, resolve_scale


def _fa2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    row_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    sm_scale: float,
) -> torch.Tensor:
    if not q.is_cuda:
        raise RuntimeError("the FlashAttention-2 adapter needs CUDA tensors")
    starts = row_starts.to(torch.int32)
    # The last entry is never read as a start when seqused_k is given.
    cu_k = torch.cat([starts, starts[-1:] + max_k])
    out = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        cu_q.to(torch.int32),
        cu_k,
        max_q,
        max_k,
        0.0,
        causal,
        False,
        scale=sm_scale,
        seqused_k=seq_lens.to(torch.int32),
    )[0]
    return out


def fa2_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    row_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_new: int,
    max_total: int,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`vtensor.kernels.extend_attention`."""
    _, dim = check_extend_args(q, k_cache, v_cache, qo_indptr, row_starts, prefix_lens)
    seq_lens = prefix_lens + (qo_indptr[1:] - qo_indptr[:-1])
    scale = resolve_scale(sm_scale, dim)
    return _fa2(
        q, k_cache, v_cache, qo_indptr, row_starts, seq_lens, max_new, max_total, True, scale
    )


def fa2_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`vtensor.kernels.decode_attention`."""
    _, dim = check_decode_args(q, k_cache, v_cache, row_starts, lengths)
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    scale = resolve_scale(sm_scale, dim)
    return _fa2(q, k_cache, v_cache, cu_q, row_starts, lengths, 1, max_len, False, scale)
