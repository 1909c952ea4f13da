"""Attention backends: how a layer reads and writes the virtual KV cache.

The model computes q/k/v and hands them, with the step's
:class:`AttentionMetadata`, to an :class:`AttentionBackend`. The metadata is
passed explicitly on every call; no backend keeps per-step state. The
backends themselves (Triton, FlashAttention-2, the fp32 torch reference) are
in ``attention_backends.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtensor.kernels import rope_store_kv, store_kv

from .rope import RopeAngles


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
    # ``[0, num_decode)`` go to the backend's decode path, the rest to its extend
    # path with ``extend_qo_indptr`` (``qo_indptr[num_decode:] - num_decode``).
    num_decode: int = 0
    decode_max_len: int = 0  # host bound on the decode requests' seq_lens
    extend_qo_indptr: torch.Tensor | None = None


class AttentionBackend(ABC):
    """Contract: ``forward`` stores this step's k/v for ``layer`` into the cache rows
    ``meta.store_rows`` and returns causal attention of ``q`` over each request's
    ``seq_lens[b]`` cached tokens, shaped like ``q`` (``[T, Hq, D]``).
    ``rope_store`` then ``attend`` do the same from the unrotated ``qkv``, the
    rotation fused into the store (the model's path when it has no q/k norm).

    These are shared: the store is our ``store_kv`` or ``rope_store_kv`` kernel
    (``store_impl`` picks Triton or its torch reference); ``attend`` sends an
    all-decode batch to ``decode``, a batch without one-token requests to
    ``extend``, and a mixed batch's leading ``num_decode`` rows to ``decode`` and
    the rest to ``extend``. Both read K/V from the cache, after the store.
    A subclass implements ``decode`` and ``extend`` on the strided layer views ``kv_views[layer]``
    (``[rows, kv_heads, head_dim]``, row ``row_starts[b] + i`` is token ``i`` of
    request ``b``).

    Implementations must not allocate per-step state that outlives the call.
    With ``supports_cuda_graphs`` they must be capturable in a CUDA graph for
    decode steps: static shapes for a given batch size, device tensors only, no
    host sync, and ``max_len`` fixed by the caller (to ``max_model_len``).
    ``validate`` rejects, before any model is built, a device, dtype or head
    size the backend cannot run, with an error naming the backend.
    """

    name: ClassVar[str]
    store_impl: ClassVar[str] = "triton"
    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(
        self,
        kv_views: Sequence[tuple[torch.Tensor, torch.Tensor]],
        sm_scale: float | None = None,
        *,
        q_heads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        # q_heads and max_batch (the most decode rows one step may carry) let a backend
        # size reusable scratch once, before any CUDA graph is captured.
        self.kv_views = list(kv_views)
        self.sm_scale = sm_scale
        self.q_heads = q_heads
        self.max_batch = max_batch

    @classmethod
    def validate(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
        """Raise ``ValueError`` if this backend cannot run here. Default: runs anywhere."""
        return None

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Store ``k``/``v`` (already rotated) at ``meta.store_rows``, then :meth:`attend`."""
        k_cache, v_cache = self.kv_views[layer]
        store_kv(k_cache, v_cache, k, v, meta.store_rows, impl=self.store_impl)
        return self.attend(layer, q, meta)

    def rope_store(
        self,
        layer: int,
        qkv: torch.Tensor,
        rope: RopeAngles,
        q_heads: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Rotate ``qkv``'s q and k heads, store k and v at ``meta.store_rows``, and return
        q ``[T, q_heads, D]``: one kernel (``rope_store_kv``) where ``forward`` needs the
        rotation done first. Follow with :meth:`attend`."""
        k_cache, v_cache = self.kv_views[layer]
        return rope_store_kv(
            qkv, rope.cos, rope.sin, k_cache, v_cache, meta.store_rows, q_heads,
            impl=self.store_impl,
        )  # fmt: skip

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of ``q`` over ``layer``'s cache, whose rows already hold this step's
        K/V (stored by ``forward`` or ``rope_store``)."""
        k_cache, v_cache = self.kv_views[layer]
        if meta.is_decode:
            return self.decode(q, k_cache, v_cache, meta.row_starts, meta.seq_lens, meta.max_len)
        nd = meta.num_decode
        if nd == 0:
            return self.extend(
                q, k_cache, v_cache, meta.qo_indptr, meta.row_starts, meta.prefix_lens,
                meta.max_new, meta.max_len,
            )  # fmt: skip
        # Mixed: an extend kernel would give each decode row a whole query block and no
        # split over its context; a decode kernel reads each context at full bandwidth.
        assert meta.extend_qo_indptr is not None, "a mixed batch needs extend_qo_indptr"
        out = torch.empty_like(q)  # both paths write their rows of it
        self.decode(
            q[:nd], k_cache, v_cache, meta.row_starts[:nd], meta.seq_lens[:nd],
            meta.decode_max_len, out[:nd],
        )  # fmt: skip
        self.extend(
            q[nd:], k_cache, v_cache, meta.extend_qo_indptr, meta.row_starts[nd:],
            meta.prefix_lens[nd:], meta.max_new, meta.max_len, out[nd:],
        )  # fmt: skip
        return out

    @abstractmethod
    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row_starts: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One query per request (``q [B, Hq, D]``) over rows ``row_starts[b] +
        [0, seq_lens[b])``; ``max_len`` bounds ``seq_lens``. Writes ``out`` if given."""

    @abstractmethod
    def extend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        qo_indptr: torch.Tensor,
        row_starts: torch.Tensor,
        prefix_lens: torch.Tensor,
        max_new: int,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed new queries (``q [T, Hq, D]``, request ``b`` owns rows
        ``qo_indptr[b]:qo_indptr[b+1]``), whose K/V are already stored after a
        ``prefix_lens[b]`` prefix; query ``i`` sees keys ``[0, prefix + i]``.
        ``max_new`` and ``max_len`` bound new and total tokens per request."""

    def precompile(self, q_heads: int, row: int) -> int:
        """Compile kernel variants ahead of serving (reading only cache row ``row``);
        returns how many ran. Backends with nothing to compile keep this default."""
        return 0
