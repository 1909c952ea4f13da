"""Launch configuration of decode attention (``decode.py``): the block, warps and
pipeline depth, the fewest tokens a split holds, the device balance, and the grid's
split count. Measured choices, stated where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .splitk import MAX_WAVES


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (defaults tuned on the H100)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Fewest tokens a request puts in one split (rounded up to block_n): a short request
    # uses fewer splits rather than many nearly empty ones.
    min_split: int = 64
    # Spread the batch's tokens over about BALANCE_WAVES × SMs programs (splitk.py); off,
    # each request splits by num_splits and min_split alone (tests that force splits).
    balance: bool = True

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps < 1 or self.num_stages < 1 or self.min_split < 1:
            raise ValueError(f"num_warps, num_stages and min_split must be >= 1: {self}")

    @property
    def name(self) -> str:
        base = f"n{self.block_n}-w{self.num_warps}-s{self.num_stages}-m{self.min_split}"
        return base if self.balance else base + "-unbalanced"


# (request, KV head) pairs from which two pipeline stages beat three. On the H100 (graph
# replay, context 1024, one split a request, KV heads fastest in the grid:
# benchmarks/results/decode_grid_order_h100_2026-11-22.txt) three stages read at 2.26
# vs 1.82 TB/s at 128 pairs (Llama-3-8B, batch 16) and 1.77 vs 1.55 at 64 (Llama-3-70B
# at TP=2, batch 16); two at 2.61 vs 2.47 at 256 (Llama-3-8B, batch 32) and 2.42 vs
# 2.30 at 256 (70B TP=2, batch 64), and the same from 512. With fewer programs each
# must keep more loads in flight. (Before the grid order, 512: kernels_decode_stages_*.)
DEEP_PIPELINE_BELOW_PAIRS = 256


def default_config(dim: int, batch: int, kv_heads: int) -> DecodeConfig:
    """The launch parameters ``decode_attention`` uses when the caller gives none."""
    stages = 3 if batch * kv_heads < DEEP_PIPELINE_BELOW_PAIRS else 2
    return DecodeConfig(block_n=64 if dim <= 128 else 32, num_stages=stages)


def choose_num_splits(
    batch: int,
    kv_heads: int,
    max_len: int,
    num_sms: int,
    min_tokens_per_split: int = 256,
    max_splits: int = 64,
    waves: int = MAX_WAVES,
) -> int:
    """The grid's splits per request, the most any request may use (the device balance
    in ``splitk.split_range`` decides how many it does): enough programs for ~``waves``
    waves at batch × KV heads, each split ≥ ``min_tokens`` of ``max_len``. (More than
    ``MAX_WAVES`` needs a workspace sized for them:
    ``DecodeWorkspace.for_batch`` covers ``MAX_WAVES``; the kernel bench sweeps it.)"""
    want = math.ceil(waves * num_sms / max(1, batch * kv_heads))
    by_len = max(1, math.ceil(max_len / min_tokens_per_split))
    return max(1, min(want, by_len, max_splits))
