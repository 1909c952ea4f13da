"""Launch configurations of the small-batch GEMV (``gemv.py``): the explicit table.

No autotuning: a serving step runs inside CUDA graphs, and an autotuner would time
candidates on first use (a stall, and a choice that can differ run to run). The
choice is a pure function of ``(M, N, K, SMs)`` (:func:`choose_config`) that any
caller may override with a :class:`GemvConfig` (the benchmark's ``--sweep`` does).

Three ways to form the products of one ``[BLOCK_M, BLOCK_K]`` tile of ``x`` with a
``[BLOCK_N, BLOCK_K]`` tile of ``W`` (``mode``):

* ``"deferred"``: elementwise fp32 products accumulated in a ``[BLOCK_M, BLOCK_N,
  BLOCK_K]`` register tile; the one reduction over K runs after the loop. Costs
  ``BLOCK_M·BLOCK_N·BLOCK_K / threads`` registers: the table keeps it at 32-64.
* ``"step"``: each step's products reduced over K at once into ``[BLOCK_M, BLOCK_N]``
  (few registers; a cross-lane reduction per step, so one warp: ``num_warps=1``).
* ``"dot"``: ``tl.dot`` with ``x`` padded to 16 rows (tensor cores need M ≥ 16; the
  wasted MMA work is free at this arithmetic intensity) and W's loads pipelined
  through shared memory (``num_stages``).

For the first two, ``BLOCK_K = 256·num_warps`` is the width at which Triton lays
every warp along K for both the ``x`` and the ``W`` tile (8 elements, 16 bytes, a
thread): the two tiles then share one register layout and broadcasting needs no
layout conversion through shared memory.

Split-K (``split_k > 1``): programs also split K; each writes fp32 partial sums to
a scratch buffer that a second kernel adds up. Used only when ``N / BLOCK_N`` alone
gives too few programs to fill the SMs (the ``dot`` mode's wide blocks on o_proj).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

MAX_M = 16  # rows of x the GEMV serves (one 16-row dot tile); larger batches are cuBLAS's
MODES = ("deferred", "step", "dot")
DOT_M = 16  # the M a "dot" tile is padded to


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration (all block sizes powers of two)."""

    block_n: int
    block_k: int
    num_warps: int
    mode: str = "deferred"
    split_k: int = 1
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")
        if self.block_k < 16 or self.block_n > 256 or self.num_warps > 16:
            raise ValueError("need block_k ≥ 16, block_n ≤ 256, num_warps ≤ 16")
        if self.mode == "dot" and self.block_n < 16:
            raise ValueError("mode 'dot' needs block_n ≥ 16 (tl.dot's minimum)")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError("split_k and num_stages must be ≥ 1")

    def block_m(self, m: int) -> int:
        """Rows of the x tile for ``m`` rows: the next power of two (16 for ``dot``)."""
        if self.mode == "dot":
            return DOT_M
        return 1 << max(0, (m - 1).bit_length())

    def label(self) -> str:
        return (
            f"{self.mode}/n{self.block_n}/k{self.block_k}/w{self.num_warps}"
            f"/s{self.split_k}/st{self.num_stages}"
        )


# The table: M bucket -> (mode, block_n, num_warps, num_stages), from the H100 sweep
# (benchmarks/results/gemv_h100_2026-11-22.*: per M, the config with the best geometric
# mean over the 8B and 70B-TP2 shapes, as a fraction of each point's best: 0.995 at
# M=1, 0.999 at M=2). From M = 3 no config beat cuBLAS across the shapes (qkv/o/down
# at 74-91% of the copy ceiling against cuBLAS's 69-89%, gate_up below it), so the
# dispatch stops at DISPATCH_MAX_M; the rows above it serve direct calls and tests.
_TABLE: tuple[tuple[int, str, int, int, int], ...] = (
    # (max M, mode, block_n, num_warps, num_stages)
    (1, "deferred", 2, 4, 1),
    (2, "deferred", 4, 4, 3),
    (16, "dot", 64, 4, 4),
)
DISPATCH_MAX_M = 2  # the linear layers' GEMV serves up to this many rows (measured)


def choose_split(n_blocks: int, k: int, block_k: int, num_sms: int) -> int:
    """Split K (powers of two) until the grid has ≥ 2 programs an SM, keeping ≥ 2 K
    blocks a split (fewer makes the partial-sum traffic comparable to the work)."""
    split = 1
    while n_blocks * split < 2 * num_sms and k >= 2 * split * 2 * block_k:
        split *= 2
    return split


@functools.cache  # asked on every call (host time); the answer is fixed and frozen
def choose_config(m: int, n: int, k: int, num_sms: int) -> GemvConfig:
    """The table's configuration for ``x [m, k] @ W[n, k].T`` on ``num_sms`` SMs."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the GEMV serves 1..{MAX_M} rows, got {m}")
    mode, block_n, warps, stages = next(row[1:] for row in _TABLE if m <= row[0])
    block_k = 128 if mode == "dot" else 256 * warps
    split = choose_split(-(-n // block_n), k, block_k, num_sms)
    return GemvConfig(block_n, block_k, warps, mode, split, stages)
