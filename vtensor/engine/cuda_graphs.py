"""CUDA graphs for decode steps, one per batch-size bucket.

A graph bakes in every address it touches. That is safe here because the KV
arena is one virtual reservation whose address never moves: as requests grow,
chunks are mapped *under* the same addresses, so a graph captured before a
request existed reads its KV correctly afterwards.

Padding rows of a bucket write to and read from a scratch slot (one mapped
chunk no request owns), so they never touch a live request's cache.

Input ids are chosen inside the graph: a row whose token the host has not
read yet (async scheduling) takes it from the token table by its slot
(``engine/token_table.py``), the others take the id copied from the host.
Both sources are static buffers, so the captured gather stays valid.
The graphs bake ``max_len = max_model_len`` into the split-K decode, which
sizes the splits for the longest context; short contexts skip empty splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.llama import LlamaForCausalLM

from .host_sync import to_device


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
        scratch: tuple[int, int],
        token_table: torch.Tensor,
    ) -> None:
        """``scratch`` is the scratch slot and its first cache row; ``token_table`` the
        table of last sampled tokens per slot (read in place by every replay)."""
        self.model, self.attn = model, attn
        self.max_bs, self.max_len = max_bs, max_len
        self.scratch_slot, self.scratch_row = scratch
        self.token_table = token_table
        self.buckets = buckets(max_bs)
        dev = token_table.device
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=dev)  # ids the host knows
        self.from_table = torch.zeros(max_bs, dtype=torch.bool, device=dev)  # else: the table's
        self.slots = torch.full((max_bs,), self.scratch_slot, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.store_rows = torch.full((max_bs,), self.scratch_row, dtype=torch.int32, device=dev)
        self.row_starts = torch.full((max_bs,), self.scratch_row, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, bs: int) -> bool:
        return bs <= self.max_bs and bool(self.graphs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller ones reuse its memory pool).

        Under tensor parallelism the graphs hold the model's NCCL collectives, so every
        rank captures the same buckets in the same order (and runs the same warm-ups).
        NCCL's watchdog thread queries its events meanwhile; in the default "global"
        capture mode such a query from another thread breaks the capture, so a parallel
        model captures in "thread_local" mode (NCCL's advice for threaded programs),
        which still refuses any unsafe call from this thread."""
        pool = torch.cuda.graph_pool_handle()
        mode = "thread_local" if self.model.group.size > 1 else "global"
        for bs in reversed(self.buckets):
            self._forward(bs)  # warm-up: compiles kernels outside the capture
            self._settle_offload()  # the warm-up may leave weight copies in flight
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                self.logits[bs] = self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Destroy every captured graph now (idempotent; ``fits`` is False after).

        Invariant relied on by tensor parallelism: a graph that captured an NCCL
        collective holds a reference on the communicator, and NCCL's destroy (or
        abort) waits until that graph is gone. So the graphs go explicitly, before
        the group, not whenever the garbage collector frees this object."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.logits.clear()

    def run(
        self,
        ids: Sequence[int],
        from_table: Sequence[bool],
        slots: Sequence[int],
        positions: Sequence[int],
        row_starts: Sequence[int],
    ) -> torch.Tensor:
        """Logits ``[bs, vocab]`` of one decode step (one token per request).

        Row ``i`` reads its input id from the token table at ``slots[i]`` where
        ``from_table[i]``, else ``ids[i]``. The returned tensor (and ``slots[:bs]``)
        are static buffers: the next replay overwrites them (stream-ordered, so work
        queued before that replay reads them intact).
        """
        bs = len(ids)
        bucket = next(b for b in self.buckets if b >= bs)
        flat = [*ids, *(int(f) for f in from_table), *slots, *positions, *row_starts]
        host = to_device(flat, torch.long, self.ids.device)
        ids_d, flags_d, slots_d, pos_d, rows_d = host.split([bs] * 5)
        self.ids[:bs].copy_(ids_d)
        self.from_table[:bs].copy_(flags_d)  # long -> bool: nonzero is True
        self.slots[:bs].copy_(slots_d)
        self.positions[:bs].copy_(pos_d)
        self.row_starts[:bs].copy_(rows_d)
        self.store_rows[:bs].copy_(rows_d + pos_d)
        self.seq_lens[:bs].copy_(pos_d + 1)
        self._reset_padding(bs, bucket)
        self._settle_offload()  # the graph reads the first ring slots without waiting
        self.graphs[bucket].replay()
        return self.logits[bucket][:bs]

    def _settle_offload(self) -> None:
        """An eager pass may leave the offload ring's next-pass copies in flight; the
        graph's first offloaded layers do not wait for them, so the stream does."""
        if self.model.offload is not None:
            self.model.offload.settle()

    def _reset_padding(self, bs: int, bucket: int) -> None:
        if bucket > bs:
            self.ids[bs:bucket].zero_()
            self.from_table[bs:bucket].fill_(False)
            self.slots[bs:bucket].fill_(self.scratch_slot)
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
        # Captured: each replay gathers the table as it is when the replay runs.
        table_ids = self.token_table.index_select(0, self.slots[:bs])
        ids = torch.where(self.from_table[:bs], table_ids, self.ids[:bs])
        hidden = self.model(ids, self.positions[:bs], self.attn, meta)
        return self.model.logits(hidden)
