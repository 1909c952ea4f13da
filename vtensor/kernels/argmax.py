"""Greedy argmax: ``torch.argmax(logits, dim=-1)`` for ``logits [B, V]``, at bandwidth.

Greedy sampling reads every logit once (``B·V`` elements: 4 MB at B = 16 of
Llama-3's 128256) and keeps one index a row; torch's generic reduction reads them
well below the HBM ceiling. Here the vocabulary is split over programs so that even
``B = 1`` spreads over the GPU: stage 1, grid ``(B, splits)``, each program scans its
range of one row in ``BLOCK``-element vectorized loads and writes its best (key,
index); stage 2, grid ``(B,)``, keeps the best of a row's splits. The merge order is
fixed: the result is deterministic.

**Same answer as torch**, ties and NaN included. Each value becomes an int32 *key*
that orders like the float (its bits, with the magnitude bits of negatives flipped;
``-0.0`` and ``+0.0`` one key, as they compare equal), NaN the largest key of all:
torch's argmax treats NaN as the maximum and returns the first NaN's index. A row's
answer is the smallest index holding its largest key: the first maximum, as torch
returns. bf16/fp16 convert to fp32 exactly, so no two values merge or swap.

**Graph-safe**: the only allocations are the output and the int32 partials
``[B, splits, 2]``, which are cached per (device, stream, B, splits) and never freed
or reallocated: a captured graph keeps their address, and calls on one stream run in
order. ``splits`` and ``blocks_per_split`` are not specialized on, and ``BLOCK_S``
depends on V only: a new batch size compiles nothing mid-serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import next_pow2, use_triton

ARGMAX_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_SPLITS = 1024  # stage 2 merges a row's splits in one tile
_KEY_NONE = -2147483647  # below every value's key (-inf's is -2139095041)
_INDEX_NONE = 2147483647  # above every index
_partials: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}


@dataclass(frozen=True)
class ArgmaxConfig:
    """The launch: ``block`` elements a program a step (``block / (32·num_warps)`` a
    thread: 16 bf16 by default, two 16-byte loads), about ``programs_per_sm`` programs
    an SM (B·splits), ``stages`` loads in flight a loop (Triton's pipelining)."""

    block: int = 4096
    num_warps: int = 8
    programs_per_sm: int = 8
    stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block < 32 * self.num_warps:
            raise ValueError(f"block {self.block} is under one element a thread")
        if self.programs_per_sm < 1 or self.stages < 1:
            raise ValueError("programs_per_sm and stages must be ≥ 1")


@triton.jit
def _key(x, ok):
    """The int32 key of each value (see the module docstring); ``_KEY_NONE`` where not ok."""
    v = x.to(tl.float32)
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) == 0, 0, bits)  # -0.0 is +0.0
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, lower
    key = tl.where(v != v, 0x7FFFFFFF, key)  # any NaN (either sign) above +inf
    return tl.where(ok, key, -2147483647)


@triton.jit(do_not_specialize=["blocks_per_split", "splits"])
def _argmax_split_kernel(
    X, Part, vocab, stride_x, blocks_per_split, splits,
    BLOCK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program ``(b, s)``: the best (key, first index) of row b's blocks
    ``[s·blocks_per_split, (s+1)·blocks_per_split)``, into ``Part[b, s]``."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split * blocks_per_split * BLOCK
    end = tl.minimum(start + blocks_per_split * BLOCK, vocab)
    full_end = start + (end - start) // BLOCK * BLOCK
    offs = tl.arange(0, BLOCK)
    base = X + row * stride_x
    best_key = tl.full([BLOCK], -2147483647, tl.int32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    # Per lane, a strictly larger key replaces: each lane keeps its first maximum.
    for s in tl.range(start, full_end, BLOCK, num_stages=STAGES):  # whole blocks: no mask
        key = _key(tl.load(base + s + offs), offs >= 0)
        take = key > best_key
        best_key = tl.where(take, key, best_key)
        best_idx = tl.where(take, s + offs, best_idx)
    if full_end < end:  # the row's tail (the last split only)
        ok = full_end + offs < end
        key = _key(tl.load(base + full_end + offs, mask=ok, other=0.0), ok)
        take = key > best_key
        best_key = tl.where(take, key, best_key)
        best_idx = tl.where(take, full_end + offs, best_idx)
    top = tl.max(best_key, axis=0)
    first = tl.min(tl.where(best_key == top, best_idx, 2147483647), axis=0)
    part = Part + (row * splits + split) * 2
    tl.store(part, top)
    tl.store(part + 1, first)


@triton.jit(do_not_specialize=["splits"])
def _argmax_merge_kernel(Part, Out, splits, BLOCK_S: tl.constexpr):
    """Row ``program_id(0)``: the first index of the largest key over its splits (the
    splits are in index order, each holding its own first maximum)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < splits
    part = Part + (row * splits + offs) * 2
    key = tl.load(part, mask=ok, other=-2147483647)
    idx = tl.load(part + 1, mask=ok, other=2147483647)
    top = tl.max(key, axis=0)
    first = tl.min(tl.where(key == top, idx, 2147483647), axis=0)
    tl.store(Out + row, first.to(tl.int64))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small grids, so tests reach several splits


@functools.cache  # asked on every call (host time); the answer is fixed
def choose_splits(batch: int, vocab: int, num_sms: int, cfg: ArgmaxConfig) -> tuple[int, int]:
    """``(splits, blocks_per_split)`` of a row: about ``programs_per_sm · SMs`` programs
    over the batch, at least one block a split, at most ``MAX_SPLITS``; no split empty."""
    blocks = triton.cdiv(vocab, cfg.block)
    want = max(1, min(blocks, MAX_SPLITS, triton.cdiv(cfg.programs_per_sm * num_sms, batch)))
    per = triton.cdiv(blocks, want)
    return triton.cdiv(blocks, per), per


def check_argmax_args(logits: torch.Tensor) -> None:
    """``logits [B, V]``: ``1 ≤ V < 2^31``, bf16/fp16/fp32, unit stride in V."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if logits.dtype not in ARGMAX_DTYPES:
        raise TypeError(f"logits must be one of {ARGMAX_DTYPES}, got {logits.dtype}")
    if not 1 <= logits.shape[1] < 2**31:
        raise ValueError(f"argmax needs 1 ≤ V < 2^31 values a row, got V={logits.shape[1]}")
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError("logits need a unit stride in V")


def _partial_buffer(device: torch.device, batch: int, splits: int) -> torch.Tensor:
    """The cached int32 ``[batch, splits, 2]`` partials of this device and stream. A first
    use allocates (under a graph capture too: from the graph's pool, kept alive here)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream, batch, splits)
    buf = _partials.get(key)
    if buf is None:
        buf = torch.empty((batch, splits, 2), dtype=torch.int32, device=device)
        _partials[key] = buf
    return buf


def argmax(
    logits: torch.Tensor, config: ArgmaxConfig | None = None, impl: str = "auto"
) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` (int64 ``[B]``; the first maximum; the first NaN
    if a row has one). ``impl``: ``"auto"`` (Triton on CUDA, torch elsewhere unless
    ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``."""
    check_argmax_args(logits)
    if not use_triton(logits, impl=impl):
        return logits.argmax(dim=-1)
    (batch, vocab), cfg = logits.shape, config or ArgmaxConfig()
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    splits, per = choose_splits(batch, vocab, _num_sms(logits.device), cfg)
    part = _partial_buffer(logits.device, batch, splits)
    _argmax_split_kernel[(batch, splits)](
        logits, part, vocab, logits.stride(0), per, splits,
        BLOCK=cfg.block, STAGES=cfg.stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    max_splits = min(triton.cdiv(vocab, cfg.block), MAX_SPLITS)
    _argmax_merge_kernel[(batch,)](part, out, splits, BLOCK_S=next_pow2(max_splits))
    return out
