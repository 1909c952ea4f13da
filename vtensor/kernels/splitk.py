"""Split-K plumbing of decode attention: the split rule, the merge, the scratch.

A program of the decode kernel (``decode.py``) owns one split ``s`` of request ``b``'s
context for one KV head. A request that uses one split is written straight to the
output. Otherwise each program writes a partial output ``mid_o[b, h, s, :]`` normalised
by its own softmax sum, and that sum's base-2 log-sum-exp ``mid_lse[b, h, s]``, in
fp32; the **last program to finish** for ``(b, KV head)`` merges them
(:func:`merge_group`): no second kernel.

**Splits are per request, on the device.** The grid has ``num_splits`` splits (a host
int, fixed by the caller, baked into a CUDA graph): the most any request may use. Each
request divides its *own* length among them (:func:`split_range`), with a split at
least ``min_split`` tokens and at least the batch's tokens spread over
``balance_programs`` programs. So a CUDA graph captured with ``max_len =
max_model_len`` spreads a short request over several splits at batch 1, and a batch
of equal requests that fills the GPU uses one split each (no partials, no merge),
while a long request among short ones still splits.

**The merge's ticket.** Each used split takes a ticket (an atomic add on a per-(request,
KV head) counter) after storing its partial; the one that draws ``used - 1`` is last,
reads every partial (past L1: another SM wrote them) and resets the counter to 0 for
the next call. The atomic is acquire-release at GPU scope and follows a block-wide
barrier, so the partials of every thread of every earlier program are visible to it.

**Scratch is reused** through a :class:`DecodeWorkspace`: one fp32 buffer sized for the
largest batch, and the zeroed tickets, so serving allocates nothing per call and a
captured graph keeps reading and writing the same addresses on every replay.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Waves of programs that ``decode.choose_num_splits`` aims the grid at: the most splits a
# request may use. Sizes the workspace: batch × splits ≤ max_batch + MAX_WAVES × SMs.
MAX_WAVES = 4
# Waves of *used* programs the device balance aims at (``split_range``): the batch's
# tokens over BALANCE_WAVES × SMs programs. On the H100 (graph replay, Llama-3-8B,
# context 1024) one split each at batch 16 read at 2.48 TB/s against 2.14 for two or
# three splits and a merge (benchmarks/results/kernels_decode_waves_h100_2026-11-22.txt).
BALANCE_WAVES = 1
NO_BALANCE = 1 << 30  # balance_programs that makes the balance term 1 token (off)


@triton.jit
def batch_tokens(Lens, batch, BLOCK_B: tl.constexpr):
    """Σ ``Lens[0:batch]`` in int64 (a few hundred int32s, L2-resident)."""
    acc = tl.zeros([BLOCK_B], tl.int64)
    for i in range(0, batch, BLOCK_B):
        offs = i + tl.arange(0, BLOCK_B)
        acc += tl.load(Lens + offs, mask=offs < batch, other=0).to(tl.int64)
    return tl.sum(acc, 0)


@triton.jit
def split_range(length, total, s, num_splits, min_split, balance_programs, kv_heads, align):
    """Tokens ``[start, end)`` of split ``s`` of a ``length``-token request, and how many
    splits it uses. A split holds at least ``min_split`` tokens and at least ``total ·
    kv_heads / balance_programs`` (the batch's ``total`` tokens over that many programs),
    rounded up to ``align`` (the block), so only the last used split has a partial
    block; ``used ≤ num_splits`` and every split below ``used`` is non-empty (the merge
    relies on it)."""
    per = tl.maximum(tl.cdiv(length, num_splits), min_split).to(tl.int64)
    per = tl.maximum(per, tl.cdiv(total * kv_heads, balance_programs))
    chunk = (tl.cdiv(per, align) * align).to(tl.int32)
    start = s * chunk
    return start, tl.minimum(start + chunk, length), tl.cdiv(length, chunk)


def used_splits(
    length: int, total: int, num_splits: int, min_split: int, balance_programs: int,
    kv_heads: int, align: int,
) -> int:  # fmt: skip
    """:func:`split_range`'s ``used`` on the host (reports, and tests against the kernel)."""
    per = max(-(-length // num_splits), min_split, -(-total * kv_heads // balance_programs))
    chunk = -(-per // align) * align
    return -(-length // chunk)


@triton.jit
def merge_group(
    MidO, MidLse, b, heads, gmask, used, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    BLOCK_G: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_G, D]``: the softmax-weighted sum of splits ``0..used-1``' partials of the
    group's query heads. Loads bypass L1 (``.cg``): other SMs wrote the partials, and
    this SM may hold stale lines of them from an earlier call."""
    offs_d = tl.arange(0, D)
    o_ptrs = MidO + b * stride_mb + heads[:, None] * stride_mh + offs_d[None, :]
    lse_ptrs = MidLse + b * stride_lb + heads * stride_lh
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for t in range(0, used):
        lse = tl.load(lse_ptrs + t, mask=gmask, other=0.0, cache_modifier=".cg")
        o = tl.load(o_ptrs + t * stride_ms, mask=gmask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)  # 0 at t = 0 (m = -inf; split 0 is never empty)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    return acc / l_sum[:, None]


@triton.jit
def publish_split(
    out, lse, out_ptrs, MidO, MidLse, ticket_ptr, b, s, heads, gmask, used,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, BLOCK_G: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """Split ``s`` of a request that uses ``used > 1``: store its partial ``out`` and
    ``lse``, take a ticket; the last one merges every partial into ``out_ptrs`` and puts
    the counter back to 0 for the next call (or graph replay)."""
    offs_d = tl.arange(0, D)
    mid = MidO + b * stride_mb + heads[:, None] * stride_mh + s * stride_ms
    tl.store(mid + offs_d[None, :], out, mask=gmask[:, None])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + s, lse, mask=gmask)
    tl.debug_barrier()  # every thread's partial stored before the ticket
    if tl.atomic_add(ticket_ptr, 1) == used - 1:  # acq_rel: the last one merges
        merged = merge_group(
            MidO, MidLse, b, heads, gmask, used,
            stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, BLOCK_G, D,
        )  # fmt: skip
        tl.store(out_ptrs, merged.to(out_ptrs.dtype.element_ty), mask=gmask[:, None])
        tl.store(ticket_ptr, 0)


@functools.cache  # queried on every decode call; the answer never changes
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, to exercise the merge


@dataclass(frozen=True)
class SplitScratch:
    """One call's split-K buffers: partials ``mid_o [B, Hq, splits, D]`` and
    ``mid_lse [B, Hq, splits]`` (fp32), and the merge's ``tickets`` (int32, ≥ B × Hkv,
    all 0 between calls)."""

    mid_o: torch.Tensor
    mid_lse: torch.Tensor
    tickets: torch.Tensor


class DecodeWorkspace:
    """Split-K scratch (``mid_o``, ``mid_lse``, ``tickets``) reused by every decode call on
    one device.

    Sized for ``capacity`` (request, split) pairs of ``q_heads × head_dim``:
    :meth:`for_batch` covers every split count ``choose_num_splits`` picks for batches up
    to ``max_batch``. Calls run in stream order, so every layer (and every captured
    graph) can share it; a graph captured with it reads and writes the same addresses
    on each replay. Never reallocated: a captured graph keeps its raw pointers.
    """

    def __init__(
        self, q_heads: int, head_dim: int, capacity: int, device: torch.device | str
    ) -> None:
        if min(q_heads, head_dim, capacity) < 1:
            raise ValueError("q_heads, head_dim and capacity must be ≥ 1")
        self.q_heads, self.head_dim, self.capacity = q_heads, head_dim, capacity
        f32 = torch.float32
        self.mid_o = torch.empty(capacity * q_heads * head_dim, dtype=f32, device=device)
        self.mid_lse = torch.empty(capacity * q_heads, dtype=f32, device=device)
        # One ticket counter per (request, KV head): capacity ≥ batch and Hq ≥ Hkv. Zero
        # here; each call's last program of a (request, KV head) puts its counter back to 0.
        self.tickets = torch.zeros(capacity * q_heads, dtype=torch.int32, device=device)
        self.device = self.mid_o.device  # "cuda" resolved to "cuda:N", as tensors report it
        self._views: dict[tuple[int, int], SplitScratch] = {}

    @classmethod
    def for_batch(
        cls, max_batch: int, q_heads: int, head_dim: int, device: torch.device | str
    ) -> DecodeWorkspace:
        """Large enough for any batch ≤ ``max_batch`` under the automatic split counts
        (``batch × splits ≤ max_batch + MAX_WAVES × SMs``): 12.8 MiB for Llama-3-8B at
        256 sequences on an H100."""
        device = torch.device(device)
        return cls(q_heads, head_dim, max_batch + MAX_WAVES * num_sms(device), device)

    def fits(self, batch: int, splits: int) -> bool:
        return batch * splits <= self.capacity

    def views(self, batch: int, splits: int) -> SplitScratch:
        """``mid_o [batch, Hq, splits, D]``, ``mid_lse [batch, Hq, splits]`` over the
        buffers' start, and the tickets; ``batch × splits`` must fit (:meth:`fits`)."""
        key = (batch, splits)
        hit = self._views.get(key)
        if hit is None:
            if not self.fits(batch, splits):
                raise ValueError(
                    f"decode workspace holds {self.capacity} (request, split) pairs, "
                    f"not {batch} × {splits}"
                )
            n, hq, d = batch * splits, self.q_heads, self.head_dim
            hit = SplitScratch(
                self.mid_o[: n * hq * d].view(batch, hq, splits, d),
                self.mid_lse[: n * hq].view(batch, hq, splits),
                self.tickets,
            )
            self._views[key] = hit  # the views cost CPU time on every call otherwise
        return hit


def check_workspace(
    workspace: DecodeWorkspace, q_heads: int, dim: int, device: torch.device
) -> None:
    """A workspace made for another model or device is the caller's bug: refused even by a
    call that needs no scratch (one split), so the mistake shows on the first call."""
    if (workspace.q_heads, workspace.head_dim, workspace.device) != (q_heads, dim, device):
        raise ValueError(
            f"workspace is for {workspace.q_heads} heads × {workspace.head_dim} on "
            f"{workspace.device}, the call is {q_heads} × {dim} on {device}"
        )


def scratch(
    workspace: DecodeWorkspace | None,
    batch: int,
    q_heads: int,
    splits: int,
    dim: int,
    device: torch.device,
) -> SplitScratch:
    """The split-K buffers of one call: the workspace's when it fits, else fresh ones.

    A fresh allocation under CUDA graph capture is an error when a workspace was given:
    the caller meant the graph to use it, and a silently different buffer would hide a
    workspace sized too small."""
    if workspace is not None:
        check_workspace(workspace, q_heads, dim, device)
        if workspace.fits(batch, splits):
            return workspace.views(batch, splits)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"decode workspace holds {workspace.capacity} (request, split) pairs, "
                f"this call needs {batch} × {splits}: size it with DecodeWorkspace.for_batch"
            )
    return SplitScratch(
        torch.empty((batch, q_heads, splits, dim), dtype=torch.float32, device=device),
        torch.empty((batch, q_heads, splits), dtype=torch.float32, device=device),
        torch.zeros(batch * q_heads, dtype=torch.int32, device=device),
    )
