"""Megatron-style tensor parallelism: which part of the model a rank holds, and the
layers whose outputs cross ranks.

| weight | split | after the matmul |
|---|---|---|
| q/k/v, gate/up | column-parallel: the rank's heads, MLP columns | nothing (heads are local) |
| o, down | row-parallel: the input columns it computed | one all-reduce (sum) |
| embedding | vocab-parallel: ``ceil(V/N)`` rows a rank | 0 for others' ids; one all-reduce |
| lm_head | vocab-parallel (tied: the embedding's rows) | an all-gather of the columns |

KV heads are split like the query heads; a model with fewer KV heads than
ranks replicates them (``N`` a multiple of ``kv_heads``): rank ``r`` holds KV
head ``r * kv_heads // N``, which every one of its query heads reads under GQA.
So every rank holds the same number of KV heads, and every rank's KV arena has
the same layout: one set of KV commands fits them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtensor.distributed import TPGroup

from .config import ModelConfig
from .linear import Linear, linear


@dataclass(frozen=True)
class ModelShard:
    """The slice of a model one rank holds (all sizes local unless named global)."""

    rank: int
    size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    q_head_start: int  # global index of the rank's first query head
    kv_head_start: int  # global index of its first KV head
    intermediate_size: int
    vocab_size: int  # global
    vocab_rows: int  # rows per rank, padding included: ceil(vocab / size)

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> ModelShard:
        """Rank ``rank`` of ``size``; a ``ValueError`` if the model cannot split so."""
        h, kv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        for what, n in (("num_attention_heads", h), ("intermediate_size", inter)):
            if n % size:
                raise ValueError(f"tensor_parallel_size {size} does not divide {what} ({n})")
        if kv % size and size % kv:
            raise ValueError(
                f"tensor_parallel_size {size} and num_key_value_heads {kv}: one must divide "
                "the other (KV heads are split, or replicated when fewer than the ranks)"
            )
        local_kv = max(1, kv // size)
        return cls(
            rank=rank,
            size=size,
            head_dim=cfg.head_dim,
            num_heads=h // size,
            num_kv_heads=local_kv,
            q_head_start=rank * (h // size),
            # Fewer KV heads than ranks: size/kv consecutive ranks share (replicate) one.
            kv_head_start=rank * kv // size if kv < size else rank * local_kv,
            intermediate_size=inter // size,
            vocab_size=cfg.vocab_size,
            vocab_rows=-(-cfg.vocab_size // size),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def intermediate_start(self) -> int:
        return self.rank * self.intermediate_size

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def vocab_real_rows(self) -> int:
        """Rows of this rank that are real tokens (the last rank's may be fewer)."""
        return max(0, min(self.vocab_rows, self.vocab_size - self.vocab_start))


class RowParallelLinear(Linear):
    """``x @ W.T`` with ``W``'s input columns split across ranks: each rank multiplies
    the columns it holds, one all-reduce sums the partial products. No bias (o and
    down have none in this family; a bias would be added once, after the sum)."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding table's rows split across ranks (``shard.vocab_rows`` each)."""

    def __init__(self, shard: ModelShard, hidden: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard.vocab_rows, hidden))
        self.start, self.rows, self.group = shard.vocab_start, shard.vocab_rows, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        # Exactly one rank holds each id: the sum is that rank's row, bit for bit.
        return self.group.all_reduce(x.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(nn.Module):
    """Logits of the rank's vocabulary rows, gathered into ``[rows, vocab]`` on every
    rank (only rank 0 samples; an all-gather is what NCCL offers and graphs capture)."""

    def __init__(self, shard: ModelShard, hidden: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard.vocab_rows, hidden))
        self.vocab, self.group = shard.vocab_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.weight)
        if self.group.size == 1:
            return logits
        if x.shape[0] == 0:  # every rank has the same rows: all skip the gather
            return logits.new_empty(0, self.vocab)
        return self.group.gather_columns(logits)[:, : self.vocab]  # padding rows dropped
