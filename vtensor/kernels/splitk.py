"""Split-K plumbing of decode attention: the split rule, the merge, the scratch.

The stage-1 kernel (``decode.py``) writes, for request ``b``, query head ``h``
and split ``s``, a partial output ``mid_o[b, h, s, :]`` normalised by its own
softmax sum, and that sum's base-2 log-sum-exp ``mid_lse[b, h, s]``, in fp32.
``merge_splits`` combines them.

**Splits are per request, on the device.** The grid has ``num_splits`` splits
(a host int, fixed by the caller, baked into a CUDA graph), but each request
divides its *own* length among them (:func:`split_range`): a CUDA graph
captured with ``max_len = max_model_len`` still spreads a short request over
every split instead of leaving it all to the first.

**Scratch is reused** through a :class:`DecodeWorkspace`: one fp32 buffer sized
for the largest batch, so serving allocates nothing per call and a captured
graph keeps reading and writing the same addresses on every replay.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INDEX_POINTERS

# Waves of programs that ``decode.choose_num_splits`` aims at by default. On the H100
# (graph replay, Llama-3-8B decode, benchmarks/results/kernels_decode_waves_h100_2026-11-22.txt)
# 1 wave was faster than the former 4 at batch 1-64 and contexts 1k-32k (geomean 1.03x):
# fewer splits mean less merge work, and from batch × KV heads ≥ SMs one split and no
# merge at all.
WAVES = 1
# The most waves any caller may aim at; sizes the workspace: batch × splits ≤
# max_batch + MAX_WAVES × SMs for every split count ``choose_num_splits`` picks.
MAX_WAVES = 4


@triton.jit
def split_range(length, s, num_splits, min_split, align):
    """Tokens ``[start, end)`` of split ``s`` of a ``length``-token request, and how many
    splits it uses. A split holds at least ``min_split`` tokens, rounded up to ``align``
    (the stage-1 block), so only the last used split has a partial block; ``used ≤
    num_splits`` and every split below ``used`` is non-empty (the merge relies on it)."""
    per = tl.maximum(tl.cdiv(length, num_splits), min_split)
    chunk = tl.cdiv(per, align) * align
    start = s * chunk
    return start, tl.minimum(start + chunk, length), tl.cdiv(length, chunk)


@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def _merge_kernel(
    MidO,
    MidLse,
    Out,
    Lens,
    num_splits,
    min_split,
    align,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # batch × Hq × splits × D can pass 2^31 elements
    h = tl.program_id(1)
    _, _, used = split_range(tl.load(Lens + b), 0, num_splits, min_split, align)
    offs_d = tl.arange(0, D)
    mid_o = MidO + b * stride_mb + h * stride_mh + offs_d[None, :]
    mid_lse = MidLse + b * stride_lb + h * stride_lh
    # Online merge over blocks of splits (a request may use hundreds): running max m,
    # weight sum l and weighted sum acc, rescaled as the max grows.
    m = tl.full([1], float("-inf"), tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < used
        lse = tl.load(mid_lse + offs_s, mask=smask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)  # 0 on the first block (m = -inf; split 0 is never empty)
        w = tl.exp2(lse - m_new)
        o = tl.load(mid_o + offs_s[:, None] * stride_ms, mask=smask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / l_sum
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def merge_splits(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    out: torch.Tensor,
    lengths: torch.Tensor,
    min_split: int,
    align: int,
) -> None:
    """``out[b, h] = Σ_s softmax-weighted mid_o[b, h, s]`` over the splits request ``b``
    used (the same :func:`split_range` rule as stage 1, with its ``min_split``/``align``)."""
    batch, q_heads, num_splits, dim = mid_o.shape
    _merge_kernel[(batch, q_heads)](
        mid_o,
        mid_lse,
        out,
        lengths,
        num_splits,
        min_split,
        align,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        D=dim,
        BLOCK_S=32 if dim <= 128 else 16,  # [BLOCK_S, D] fp32 per step: ≤ 32 registers/thread
    )


@functools.cache  # queried on every decode call; the answer never changes
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, to exercise the merge


class DecodeWorkspace:
    """Split-K scratch (``mid_o``, ``mid_lse``) reused by every decode call on one device.

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
        self.device = self.mid_o.device  # "cuda" resolved to "cuda:N", as tensors report it
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

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

    def views(self, batch: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mid_o [batch, Hq, splits, D], mid_lse [batch, Hq, splits])`` over the
        buffers' start; ``batch × splits`` must fit (:meth:`fits`)."""
        key = (batch, splits)
        hit = self._views.get(key)
        if hit is None:
            if not self.fits(batch, splits):
                raise ValueError(
                    f"decode workspace holds {self.capacity} (request, split) pairs, "
                    f"not {batch} × {splits}"
                )
            n, hq, d = batch * splits, self.q_heads, self.head_dim
            hit = (
                self.mid_o[: n * hq * d].view(batch, hq, splits, d),
                self.mid_lse[: n * hq].view(batch, hq, splits),
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
) -> tuple[torch.Tensor, torch.Tensor]:
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
    mid_o = torch.empty((batch, q_heads, splits, dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch, q_heads, splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse
