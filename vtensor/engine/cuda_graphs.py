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

import torch

from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.llama import LlamaForCausalLM


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
        z = dict(device=device)
        self.ids = torch.zeros(max_bs, dtype=torch.long, **z)
        self.positions = torch.zeros(max_bs, dtype=torch.long, **z)
        self.store_rows = torch.full((max_bs,), scratch_row, dtype=torch.int32, **z)
        self.row_starts = torch.full((max_bs,), scratch_row, dtype=torch.int32, **z)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, **z)
        self.indptr = torch.arange(max_bs + 1, dtype=torch.int32, **z)
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
        self, ids: Sequence[int], positions: Sequence[int], row_starts: Sequence[int]
    ) -> torch.Tensor:
        """Logits ``[bs, vocab]`` of one decode step (one token per request)."""
        bs = len(ids)
        bucket = next(b for b in self.buckets if b >= bs)
        host = torch.tensor([list(ids), list(positions), list(row_starts)], dtype=torch.long)
        host = host.pin_memory().to(self.ids.device, non_blocking=True)
        self.ids[:bs].copy_(host[0])
        self.positions[:bs].copy_(host[1])
        self.row_starts[:bs].copy_(host[2])
        self.store_rows[:bs].copy_(host[2] + host[1])
        self.seq_lens[:bs].copy_(host[1] + 1)
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
