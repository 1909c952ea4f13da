"""ModelRunner: turn a scheduled batch into tensors, run the model, return logits.

Decode-only batches replay a CUDA graph of their batch-size bucket when
graphs are on; everything else runs eagerly through the same model code.

The runner takes each span as a :class:`SpanInput`: plain ints that rank 0
builds from the request and, under tensor parallelism, sends to every other
rank, whose runners run the very same batch. A span's input ids come from its
request's ``token_ids``, except a last token the host has not read yet (async
scheduling): the step in flight sampled it into the token table, and the
runner gathers it from there by the request's slot (``engine/token_table.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.kvcache.layout import KVLayout
from vtensor.memory.torch_workspace import TorchWorkspace
from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.llama import LlamaForCausalLM

from .cuda_graphs import DecodeGraphs
from .host_sync import to_device
from .scheduler import ScheduledSpan
from .token_table import TokenTable


@dataclass(frozen=True)
class SpanInput:
    """One span as every rank's runner needs it: no request, only ints (picklable)."""

    rid: int
    slot: int
    start: int  # position of the span's first token
    ids: list[int]  # its input ids; the last is a stand-in (0) when ``unread``
    unread: bool  # the last id is the token table's entry of ``slot``, not ``ids[-1]``
    samples: bool  # the span reaches its request's end: a token is sampled

    @classmethod
    def of(cls, span: ScheduledSpan, slot: int) -> SpanInput:
        ids, unread = input_ids(span)
        return cls(span.req.rid, slot, span.start, ids, unread, span.samples)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


@dataclass(frozen=True)
class ForwardOutput:
    """The logits of the spans that sample, in batch order, and their slots (on the
    device), where the step's sampled tokens go in the token table."""

    logits: torch.Tensor
    sample_slots: torch.Tensor


@dataclass(frozen=True)
class BatchRows:
    """Host-side description of a batch: per request, its slot and span."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]  # new tokens per request


@dataclass(frozen=True)
class TableReads:
    """Input ids to take from the token table: ``ids[rows[i]] = table[slots[i]]``."""

    rows: list[int]  # positions in the step's packed input ids
    slots: list[int]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        layout: KVLayout,
        tokens: TokenTable,
        graphs: DecodeGraphs | None,
    ) -> None:
        self.model = model
        self.attn = attn
        self.layout = layout
        self.tokens = tokens
        self.device = tokens.tokens.device
        self.graphs = graphs
        # The unified pool on CUDA (``elastic_setup.attach_workspace``): eager steps
        # allocate from the KV's chunk pool. Graph replays allocate nothing there: the
        # graphs keep their own fixed pool.
        self.workspace: TorchWorkspace | None = None
        self.workspace_retries = 0

    def release_graphs(self) -> None:
        """Destroy the decode graphs (before leaving a tensor-parallel group: see
        ``DecodeGraphs.release``); later decode steps run eagerly."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def release_workspace(self) -> None:
        """Close the pool-backed workspace (the engine closes): its chunks go back."""
        if self.workspace is not None:
            self.workspace.close()
            self.workspace = None

    @torch.inference_mode()
    def execute(self, spans: Sequence[SpanInput]) -> ForwardOutput:
        """Run the batch; the logits of the spans that sample, in batch order."""
        is_decode = all(sp.num_tokens == 1 for sp in spans)
        if is_decode and self.graphs is not None and self.graphs.fits(len(spans)):
            return self._replay(spans)
        if self.workspace is None:
            return self._eager(spans)
        try:
            with self.workspace.use():
                return self._eager(spans)
        except torch.OutOfMemoryError:
            pass  # retried below: out of the handler, whose traceback holds the attempt's tensors
        # Segments cached for other step sizes can leave no run of the size this step
        # asks for: give them back and run the step again (its KV writes are the same
        # values, so the partial first attempt leaves nothing wrong).
        self.workspace.release_cached()
        self.workspace_retries += 1
        with self.workspace.use():
            return self._eager(spans)

    def _eager(self, spans: Sequence[SpanInput]) -> ForwardOutput:
        is_decode = all(sp.num_tokens == 1 for sp in spans)
        # Decode requests first (a stable sort), so attention can send them to the
        # decode kernel; the logits still come back in the batch's order.
        order = sorted(range(len(spans)), key=lambda i: spans[i].num_tokens != 1)
        batch = [spans[i] for i in order]
        rows = BatchRows(
            [sp.slot for sp in batch], [sp.start for sp in batch], [sp.num_tokens for sp in batch]
        )
        ids: list[int] = []
        read_rows: list[int] = []
        read_slots: list[int] = []
        last: dict[int, int] = {}  # batch index -> its last input row, for spans that sample
        for i, sp in zip(order, batch):
            ids += sp.ids
            if sp.unread:
                read_rows.append(len(ids) - 1)
                read_slots.append(sp.slot)
            if sp.samples:
                last[i] = len(ids) - 1
        sampling = sorted(last)
        sample_rows = [[last[i] for i in sampling], [spans[i].slot for i in sampling]]
        input_ids_d, positions, meta, (last_d, sample_slots) = self._prepare(
            ids, rows, is_decode, TableReads(read_rows, read_slots), sample_rows
        )
        hidden = self.model(input_ids_d, positions, self.attn, meta)
        return ForwardOutput(self.model.logits(hidden[last_d]), sample_slots)

    def _prepare(
        self,
        ids: list[int],
        rows: BatchRows,
        is_decode: bool,
        reads: TableReads,
        extra: Sequence[list[int]],
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
        """Input ids (with ``reads`` gathered from the token table), positions and the
        attention metadata; ``extra`` index lists ride along in the same transfer."""
        row_starts = self._row_starts(rows)
        positions: list[int] = []
        store: list[int] = []
        for r0, s, n in zip(row_starts, rows.starts, rows.lengths):
            positions.extend(range(s, s + n))
            store.extend(range(r0 + s, r0 + s + n))
        indptr = [0, *itertools.accumulate(rows.lengths)]
        seq_lens = [s + n for s, n in zip(rows.starts, rows.lengths)]
        # In a mixed batch the one-token requests lead (``execute`` orders them first) and
        # take the decode kernel; an all-decode batch is marked by is_decode instead.
        nd = 0 if is_decode else rows.lengths.count(1)
        ints = _to_device_all(
            [store, row_starts, rows.starts, seq_lens, indptr, [p - nd for p in indptr[nd:]]],
            torch.int32,
            self.device,
        )
        longs = _to_device_all(
            [ids, positions, reads.rows, reads.slots, *extra], torch.long, self.device
        )
        if reads.rows:
            longs[0].index_copy_(0, longs[2], self.tokens.gather(longs[3]))
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
        return longs[0], longs[1], meta, longs[4:]

    def _replay(self, spans: Sequence[SpanInput]) -> ForwardOutput:
        """A decode batch through its CUDA graph, which gathers table rows itself."""
        assert self.graphs is not None
        slots = [sp.slot for sp in spans]
        logits = self.graphs.run(
            [sp.ids[0] for sp in spans],
            [sp.unread for sp in spans],
            slots,
            [sp.start for sp in spans],
            [self.layout.row_start(s) for s in slots],
        )
        sample_slots = self.graphs.slots[: len(spans)]
        if all(sp.samples for sp in spans):  # always, in practice
            return ForwardOutput(logits, sample_slots)
        # A budget-limited prefill span of one token does not sample.
        keep = to_device([i for i, sp in enumerate(spans) if sp.samples], torch.long, self.device)
        return ForwardOutput(logits[keep], sample_slots[keep])

    def _row_starts(self, rows: BatchRows) -> list[int]:
        return [self.layout.row_start(s) for s in rows.slots]


def input_ids(span: ScheduledSpan) -> tuple[list[int], bool]:
    """The span's input ids, and whether its last one is still on the device.

    Only a span's last token can be unread: a step samples at most one token per
    request, and the scheduler plans at most one step ahead of the host's reads.
    Its id here is a stand-in (0) that the token table overwrites on the device.
    """
    req = span.req
    known = len(req.token_ids)
    if span.end > known + 1 or span.start >= known + 1:
        raise RuntimeError(f"request {req.rid}: span {span.start}:{span.end} but {known} read")
    if span.end <= known:
        return req.token_ids[span.start : span.end], False
    return [*req.token_ids[span.start : known], 0], True


def _to_device_all(
    lists: list[list[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One host tensor, one copy: small per-step index lists cost one transfer, not five."""
    flat = to_device([x for lst in lists for x in lst], dtype, device)
    return list(flat.split([len(lst) for lst in lists]))
