"""Synthetic workloads with vLLM's definitions (NOTES §5): no dataset downloads."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_ids: list[int]
    output_len: int


def random_dataset(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    prefix_len: int = 0,
) -> list[SyntheticRequest]:
    """vLLM "random": lengths uniform in ``[L(1-r), L(1+r)]``; prompt ``i`` is
    ``(offset_i + i + arange(len)) % vocab`` with a random offset per prompt, after a
    random ``prefix_len``-token prefix that every prompt shares (vLLM's
    ``--random-prefix-len``: a shared system prompt)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for i in range(num_prompts):
        n, offset = length(input_len), rng.randrange(vocab_size)
        ids = prefix + [(offset + i + j) % vocab_size for j in range(n)]
        out.append(SyntheticRequest(ids, length(output_len)))
    return out
