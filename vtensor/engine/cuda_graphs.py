"""CUDA graphs for decode steps, one per batch-size bucket.

A graph bakes in every address it touches. That is safe here because the KV
arena is one virtual reservation whose address never moves: as requests grow,
chunks are mapped *under* the same addresses, so a graph captured before a
request existed reads its KV correctly afterwards.

Padding rows of a bucket write to and read from a scratch slot (one mapped
chunk no request owns), so they never touch a live request's cache.
The graphs bake ``max_len = max_model_len`` into the split-K decode, which
sizes the splits for the longest context; short contexts skip empty splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.llama import LlamaForCausalLM

from .host_sync import to_device


@dataclass(frozen=True)
class TokenFeed:
    """Input ids that are still on the device: ``ids[dst[i]] = tokens[src[i]]``."""

    tokens: torch.Tensor  # the previous step's sampled tokens
    dst: list[int]  # positions in this step's input ids
    src: list[int]  # rows of ``tokens``


def buckets(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted({*sizes, max_bs})


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        max_bs: int,
        max_len: int,
        scratch_row: int,
        device: torch.device,
    ) -> None:
        self.model, self.attn = model, attn
        self.max_bs, self.max_len, self.scratch_row = max_bs, max_len, scratch_row
        self.buckets = buckets(max_bs)
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.store_rows = torch.full((max_bs,), scratch_row, dtype=torch.int32, device=device)
        self.row_starts = torch.full((max_bs,), scratch_row, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, bs: int) -> bool:
        return bs <= self.max_bs and bool(self.graphs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller ones reuse its memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            self._forward(bs)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        row_starts: Sequence[int],
        feed: TokenFeed | None = None,
    ) -> torch.Tensor:
        """Logits ``[bs, vocab]`` of one decode step (one token per request).

        The returned tensor is the graph's static output: the next replay
        overwrites it (stream-ordered, so work queued before that replay reads it).
        """
        bs = len(ids)
        bucket = next(b for b in self.buckets if b >= bs)
        n = len(feed.dst) if feed else 0
        flat = [
            *ids,
            *positions,
            *row_starts,
            *(feed.dst if feed else ()),
            *(feed.src if feed else ()),
        ]
        host = to_device(flat, torch.long, self.ids.device)
        ids_d, pos_d, rows_d, dst, src = host.split([bs, bs, bs, n, n])
        self.ids[:bs].copy_(ids_d)
        if feed:
            self.ids.index_copy_(0, dst, feed.tokens.index_select(0, src))
        self.positions[:bs].copy_(pos_d)
        self.row_starts[:bs].copy_(rows_d)
        self.store_rows[:bs].copy_(rows_d + pos_d)
        self.seq_lens[:bs].copy_(pos_d + 1)
        self._reset_padding(bs, bucket)
        self.graphs[bucket].replay()
        return self.logits[bucket][:bs]

    def _reset_padding(self, bs: int, bucket: int) -> None:
        if bucket > bs:
            self.ids[bs:bucket].zero_()
            self.positions[bs:bucket].zero_()
            self.store_rows[bs:bucket].fill_(self.scratch_row)
            self.row_starts[bs:bucket].fill_(self.scratch_row)
            self.seq_lens[bs:bucket].fill_(1)

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(
            store_rows=self.store_rows[:bs],
            row_starts=self.row_starts[:bs],
            prefix_lens=self.positions[:bs].int(),
            seq_lens=self.seq_lens[:bs],
            qo_indptr=self.indptr[: bs + 1],
            max_new=1,
            max_len=self.max_len,
            is_decode=True,
        )
        hidden = self.model(self.ids[:bs], self.positions[:bs], self.attn, meta)
        return self.model.logits(hidden)
