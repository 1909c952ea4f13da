"""Attention backends: how a layer reads and writes the virtual KV cache.

The model computes q/k/v and hands them, with the step's
:class:`AttentionMetadata`, to an :class:`AttentionBackend`. The metadata is
passed explicitly on every call; no backend keeps per-step state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.kernels import decode_attention, extend_attention, store_kv


@dataclass(frozen=True)
class AttentionMetadata:
    """One forward step's batch, as the kernels see it (all tensors on the model's device).

    Tokens are packed request by request; request ``b`` owns query rows
    ``qo_indptr[b]:qo_indptr[b+1]``, its cache starts at row ``row_starts[b]``
    and already holds ``prefix_lens[b]`` tokens.
    """

    store_rows: torch.Tensor  # [T] cache row of each new token
    row_starts: torch.Tensor  # [B]
    prefix_lens: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] prefix + new
    qo_indptr: torch.Tensor  # [B+1]
    max_new: int  # host bound on new tokens per request
    max_len: int  # host bound on seq_lens
    is_decode: bool  # every request has exactly one new token


class AttentionBackend(ABC):
    """Contract: ``forward`` stores this step's k/v for ``layer`` into the cache rows
    ``meta.store_rows`` and returns causal attention of ``q`` over each request's
    ``seq_lens[b]`` cached tokens, shaped like ``q`` (``[T, Hq, D]``).

    Implementations must not allocate per-step state that outlives the call,
    and must be capturable in a CUDA graph for decode steps (static shapes for
    a given batch size; device tensors only, ``max_len`` fixed by the caller).
    """

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...


class VirtualKVAttention(AttentionBackend):
    """Our Triton kernels (or their fp32 torch references) on strided layer views."""

    def __init__(
        self,
        kv_views: Sequence[tuple[torch.Tensor, torch.Tensor]],
        impl: str = "auto",
        sm_scale: float | None = None,
    ) -> None:
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"attention impl must be auto/triton/torch, got {impl!r}")
        self.kv_views = list(kv_views)
        self.impl = impl
        self.sm_scale = sm_scale

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_views[layer]
        store_kv(k_cache, v_cache, k, v, meta.store_rows, impl=self.impl)
        if meta.is_decode:
            return decode_attention(
                q,
                k_cache,
                v_cache,
                meta.row_starts,
                meta.seq_lens,
                meta.max_len,
                sm_scale=self.sm_scale,
                impl=self.impl,
            )
        return extend_attention(
            q,
            k_cache,
            v_cache,
            meta.qo_indptr,
            meta.row_starts,
            meta.prefix_lens,
            meta.max_new,
            sm_scale=self.sm_scale,
            impl=self.impl,
        )
