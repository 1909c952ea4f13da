"""ModelRunner: turn a scheduled batch into tensors, run the model, return logits.

Decode-only batches replay a CUDA graph of their batch-size bucket when
graphs are on; everything else runs eagerly through the same model code.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.kvcache.layout import KVLayout
from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.llama import LlamaForCausalLM

from .cuda_graphs import DecodeGraphs, TokenFeed
from .host_sync import to_device
from .request import PLACEHOLDER
from .scheduler import ScheduledChunk


@dataclass(frozen=True)
class DeviceTokens:
    """The previous step's sampled tokens, still on the device (async scheduling):
    request ``rid``'s token is ``tokens[rows[rid]]``."""

    tokens: torch.Tensor
    rows: dict[int, int]


@dataclass(frozen=True)
class BatchRows:
    """Host-side description of a batch: per request, its slot and chunk."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]  # new tokens per request


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        layout: KVLayout,
        device: torch.device,
        graphs: DecodeGraphs | None,
    ) -> None:
        self.model = model
        self.attn = attn
        self.layout = layout
        self.device = device
        self.graphs = graphs

    @torch.inference_mode()
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        slots: Sequence[int],
        pending: DeviceTokens | None = None,
    ) -> torch.Tensor:
        """Logits ``[S, vocab]`` for the chunks that sample, in batch order.

        A chunk whose last token is a placeholder takes it from ``pending``.
        """
        is_decode = all(c.num_tokens == 1 for c in chunks)
        if is_decode and self.graphs is not None and self.graphs.fits(len(chunks)):
            ids = [c.req.token_ids[c.start] for c in chunks]
            rows = BatchRows(list(slots), [c.start for c in chunks], [1] * len(chunks))
            feed = _feed(chunks, range(len(chunks)), pending)
            logits = self.graphs.run(ids, rows.starts, self._row_starts(rows), feed)
            if all(c.samples for c in chunks):  # always, in practice
                return logits
            return logits[[i for i, c in enumerate(chunks) if c.samples]]
        # Decode requests first (a stable sort), so attention can send them to the
        # decode kernel; the logits still come back in the batch's order.
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].num_tokens != 1)
        chunks = [chunks[i] for i in order]
        ids = [t for c in chunks for t in c.req.token_ids[c.start : c.end]]
        rows = BatchRows(
            [slots[i] for i in order], [c.start for c in chunks], [c.num_tokens for c in chunks]
        )
        ends = list(itertools.accumulate(rows.lengths))  # a chunk's last row is its end - 1
        feed = _feed(chunks, [e - 1 for e in ends], pending)
        input_ids, positions, meta = self.prepare(ids, rows, is_decode, feed)
        hidden = self.model(input_ids, positions, self.attn, meta)
        last_of = {i: ends[k] - 1 for k, i in enumerate(order) if chunks[k].samples}
        last = to_device([last_of[i] for i in sorted(last_of)], torch.long, self.device)
        return self.model.logits(hidden[last])

    def prepare(
        self, ids: list[int], rows: BatchRows, is_decode: bool, feed: TokenFeed | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        row_starts = self._row_starts(rows)
        positions: list[int] = []
        store: list[int] = []
        for r0, s, n in zip(row_starts, rows.starts, rows.lengths):
            positions.extend(range(s, s + n))
            store.extend(range(r0 + s, r0 + s + n))
        indptr = [0, *itertools.accumulate(rows.lengths)]
        seq_lens = [s + n for s, n in zip(rows.starts, rows.lengths)]
        # In a mixed batch the one-token requests lead (execute orders them first) and
        # take the decode kernel; an all-decode batch is marked by is_decode instead.
        nd = 0 if is_decode else rows.lengths.count(1)
        ints = _to_device_all(
            [store, row_starts, rows.starts, seq_lens, indptr, [p - nd for p in indptr[nd:]]],
            torch.int32,
            self.device,
        )
        dst, src = (feed.dst, feed.src) if feed else ([], [])
        longs = _to_device_all([ids, positions, dst, src], torch.long, self.device)
        if feed:
            longs[0].index_copy_(0, longs[2], feed.tokens.index_select(0, longs[3]))
        meta = AttentionMetadata(
            store_rows=ints[0],
            row_starts=ints[1],
            prefix_lens=ints[2],
            seq_lens=ints[3],
            qo_indptr=ints[4],
            max_new=max(rows.lengths[nd:]),
            max_len=max(seq_lens),
            is_decode=is_decode,
            num_decode=nd,
            decode_max_len=max(seq_lens[:nd], default=0),
            extend_qo_indptr=ints[5] if nd else None,
        )
        return longs[0], longs[1], meta

    def _row_starts(self, rows: BatchRows) -> list[int]:
        return [self.layout.row_start(s) for s in rows.slots]


def _feed(
    chunks: Sequence[ScheduledChunk], last_rows: Sequence[int], pending: DeviceTokens | None
) -> TokenFeed | None:
    """Where placeholders stand in the batch's input ids, and which pending rows fill them.
    Only a chunk's last token can be a placeholder (``Request``'s invariant)."""
    dst, src = [], []
    for c, row in zip(chunks, last_rows):
        if c.req.token_ids[c.end - 1] == PLACEHOLDER:
            if pending is None or c.req.rid not in pending.rows:
                raise RuntimeError(f"request {c.req.rid} awaits a token no pending step has")
            dst.append(row)
            src.append(pending.rows[c.req.rid])
    return TokenFeed(pending.tokens, dst, src) if dst and pending is not None else None


def _to_device_all(
    lists: list[list[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One host tensor, one copy: small per-step index lists cost one transfer, not five."""
    flat = to_device([x for lst in lists for x in lst], dtype, device)
    return list(flat.split([len(lst) for lst in lists]))
