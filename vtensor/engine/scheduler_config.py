"""SchedulerConfig: the scheduler's limits per step (torch-free; ``scheduler.py`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    lookahead_tokens: int = 4  # decode steps mapped ahead (vAttention maps ~10 ahead)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.lookahead_tokens < 0:
            raise ValueError("lookahead_tokens must be >= 0")
