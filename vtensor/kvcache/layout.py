"""The KV arena layout: token-major, all layers of a token adjacent.

    arena[slot, token, layer, kv, head, dim]      kv: 0 = K, 1 = V

One 2 MiB chunk then holds every layer of a handful of tokens (16 for
Llama-3-8B), so a request wastes at most one chunk (NOTES §2). The price is
that one layer's K is a *strided* view: consecutive tokens are
``token_stride`` elements apart. Every kernel takes strides and never assumes
contiguity; a measured layer-group factor was not needed (NOTES §2: no TLB
cliff up to a 64 GiB buffer at 128 KiB strides).

Row ``r = slot * max_tokens + position`` of a layer view is token
``position`` of request slot ``slot``; kernels receive the first row of each
request (``row_start = slot * max_tokens``) and its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_ROWS = 2**31 - 1  # slots x max_tokens: cache rows are addressed with int32


@dataclass(frozen=True)
class KVLayout:
    num_slots: int
    max_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_tokens", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"KV dtype must be floating point, got {self.dtype}")
        # Row indices (slot * max_tokens + position) travel as int32 in the step metadata
        # and in FA2's cu_seqlens; element offsets inside the kernels are 64-bit.
        if self.num_slots * self.max_tokens > MAX_ROWS:
            raise ValueError(
                f"{self.num_slots} slots x {self.max_tokens} tokens = "
                f"{self.num_slots * self.max_tokens} cache rows; row indices are int32, so at "
                f"most {MAX_ROWS}: lower max_num_seqs or max_model_len"
            )

    # ---------------------------------------------------------------- strides
    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_slots,
            self.max_tokens,
            self.num_layers,
            2,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def head_stride(self) -> int:
        return self.head_dim

    @property
    def kv_stride(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_stride(self) -> int:
        return 2 * self.kv_stride

    @property
    def token_stride(self) -> int:
        """Elements between consecutive tokens (rows) of one layer's K or V."""
        return self.num_layers * self.layer_stride

    @property
    def slot_stride(self) -> int:
        return self.max_tokens * self.token_stride

    @property
    def strides(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.slot_stride,
            self.token_stride,
            self.layer_stride,
            self.kv_stride,
            self.head_stride,
            1,
        )

    # ------------------------------------------------------------------ sizes
    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.token_stride * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.max_tokens * self.bytes_per_token

    def tokens_per_chunk(self, chunk_size: int) -> float:
        """Tokens one physical chunk holds (fractional when a token straddles two chunks)."""
        return chunk_size / self.bytes_per_token

    def chunks_for_tokens(self, tokens: int, chunk_size: int) -> int:
        return math.ceil(tokens * self.bytes_per_token / chunk_size)

    def row_start(self, slot: int) -> int:
        return slot * self.max_tokens

    # ------------------------------------------------------------------ views
    def k_view(self, arena: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K as ``[num_slots * max_tokens, kv_heads, head_dim]``."""
        return self._layer_view(arena, layer, 0)

    def v_view(self, arena: torch.Tensor, layer: int) -> torch.Tensor:
        return self._layer_view(arena, layer, 1)

    def allocate(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A plain dense arena (tests, CPU fallback); the engine uses a VirtualTensor."""
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def _layer_view(self, arena: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        if arena.dtype != self.dtype:
            raise TypeError(f"arena dtype {arena.dtype} != layout dtype {self.dtype}")
        if arena.numel() < self.num_slots * self.slot_stride or not arena.is_contiguous():
            raise ValueError("arena must be a contiguous tensor of at least the layout's size")
        rows = self.num_slots * self.max_tokens
        offset = arena.storage_offset() + layer * self.layer_stride + kv * self.kv_stride
        return arena.as_strided(
            (rows, self.num_kv_heads, self.head_dim),
            (self.token_stride, self.head_stride, 1),
            offset,
        )
