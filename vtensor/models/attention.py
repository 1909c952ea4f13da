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
from vtensor.kernels.decode import precompile_decode


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
    # A mixed batch puts its decode requests (one new token each) first: rows
    # ``[0, num_decode)`` go to the split-K decode kernel, the rest to the extend
    # kernel with ``extend_qo_indptr`` (``qo_indptr[num_decode:] - num_decode``).
    num_decode: int = 0
    decode_max_len: int = 0  # host bound on the decode requests' seq_lens
    extend_qo_indptr: torch.Tensor | None = None


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

    def precompile(self, q_heads: int, row: int) -> int:
        """Compile kernel variants ahead of serving (reading only cache row ``row``);
        returns how many ran. Backends with nothing to compile keep this default."""
        return 0


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
            return self._decode(q, k_cache, v_cache, meta.row_starts, meta.seq_lens, meta.max_len)
        nd = meta.num_decode
        if nd == 0:
            return self._extend(q, k_cache, v_cache, meta.qo_indptr, meta.row_starts, meta)
        # Mixed: the extend kernel would give each decode row a whole query block and no
        # split over its context; the decode kernel reads each context at full bandwidth.
        assert meta.extend_qo_indptr is not None, "a mixed batch needs extend_qo_indptr"
        out = torch.empty_like(q)  # both kernels write their rows of it in place
        self._decode(
            q[:nd], k_cache, v_cache, meta.row_starts[:nd], meta.seq_lens[:nd],
            meta.decode_max_len, out[:nd],
        )  # fmt: skip
        self._extend(
            q[nd:], k_cache, v_cache, meta.extend_qo_indptr, meta.row_starts[nd:], meta, out[nd:]
        )
        return out

    def precompile(self, q_heads: int, row: int) -> int:
        k_cache, v_cache = self.kv_views[0]  # every layer's view has the same strides
        return precompile_decode(q_heads, k_cache, v_cache, row, impl=self.impl)

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row_starts: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return decode_attention(
            q, k_cache, v_cache, row_starts, seq_lens, max_len,
            sm_scale=self.sm_scale, impl=self.impl, out=out,
        )  # fmt: skip

    def _extend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        qo_indptr: torch.Tensor,
        row_starts: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        nd = meta.num_decode
        return extend_attention(
            q, k_cache, v_cache, qo_indptr, row_starts, meta.prefix_lens[nd:], meta.max_new,
            sm_scale=self.sm_scale, impl=self.impl, out=out,
        )  # fmt: skip
