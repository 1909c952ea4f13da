"""KVGeometry: the arena's sizes in plain integers (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGeometry:
    """Runtime-derived sizes of the arena (plain integers)."""

    num_slots: int
    max_tokens: int  # per slot; slot_bytes is a whole number of chunks
    bytes_per_token: int
    chunk_size: int
    capacity_chunks: int

    def __post_init__(self) -> None:
        if min(self.num_slots, self.max_tokens, self.bytes_per_token, self.chunk_size) <= 0:
            raise ValueError(f"KV geometry sizes must be positive: {self}")
        if self.slot_bytes % self.chunk_size:
            raise ValueError("a slot must be a whole number of chunks")

    @property
    def slot_bytes(self) -> int:
        return self.max_tokens * self.bytes_per_token

    @property
    def chunks_per_slot(self) -> int:
        return self.slot_bytes // self.chunk_size

    def chunks_for(self, tokens: int) -> int:
        return math.ceil(min(tokens, self.max_tokens) * self.bytes_per_token / self.chunk_size)

    def chunk_of(self, position: int) -> int:
        """The chunk index (within a slot) holding the first byte of token ``position``."""
        return position * self.bytes_per_token // self.chunk_size

    def cache_block(self) -> tuple[int, int]:
        """``(tokens, chunks)`` of the smallest run of whole tokens that fills whole
        chunks: the prefix cache's unit. ``(16, 1)`` for Llama-3-8B (128 KiB per token,
        2 MiB chunks); when a chunk does not hold whole tokens (Qwen2.5-7B: 56 KiB per
        token) it spans several chunks: ``(256, 7)``."""
        g = math.gcd(self.chunk_size, self.bytes_per_token)
        return self.chunk_size // g, self.bytes_per_token // g

    @staticmethod
    def aligned_max_tokens(max_tokens: int, bytes_per_token: int, chunk_size: int) -> int:
        """The smallest length ≥ ``max_tokens`` whose slot is a whole number of chunks."""
        step = chunk_size // math.gcd(chunk_size, bytes_per_token)
        return math.ceil(max_tokens / step) * step
