"""WorkspaceTable: the forward pass's workspace (activation) bytes as a function of a
step's tokens, measured once at warm-up (``engine/workspace_measure.py``). Torch-free.

A step of ``t`` tokens samples at most ``min(t, max_num_seqs)`` rows (one per
request), so the table stores, for each measured token count, the worst case over
the rows such a step can have: one key (tokens) is enough for the planner.

Between measured points the need is interpolated linearly and rounded *up* to whole
chunks; the stored bytes are made monotone (a running maximum) so that a larger step
never needs less than a smaller one because of measurement noise. ``margin_chunks``
is added to every step's chunks: the workspace's allocator takes whole-chunk
*segments*, and at a token count between two measured points each segment may round
up where the measured ones did not (up to one chunk a segment, which linear
interpolation of the measured totals misses: measured on the H100, a 44,684-token
step needed more than its interpolated 3,598 chunks, in 12 segments). A step of more
tokens than the last point is refused: no step exceeds ``max_num_batched_tokens``,
the last point measured.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkspaceTable:
    """``points``: ``(tokens, bytes)`` pairs, tokens strictly increasing from 1; bytes
    are made monotone on construction (``monotone``). ``source`` says how the bytes
    were obtained: ``"measured"`` (the device's allocator, at warm-up) or
    ``"estimated"`` (from tensor shapes: the CPU has no allocator to ask)."""

    points: tuple[tuple[int, int], ...]
    chunk_size: int
    source: str
    # Chunks added to every step's need: the most segments a measured step held (each
    # may round up by one chunk between the measured points; see the module docstring).
    margin_chunks: int = 0

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a workspace table needs at least one point")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.source not in ("measured", "estimated"):
            raise ValueError(f"source must be 'measured' or 'estimated', got {self.source!r}")
        tokens = [t for t, _ in self.points]
        if tokens[0] < 1 or any(b <= a for a, b in itertools.pairwise(tokens)):
            raise ValueError(f"token counts must increase strictly from >= 1, got {tokens}")
        if any(b < 0 for _, b in self.points):
            raise ValueError("workspace bytes must be >= 0")
        if self.margin_chunks < 0:
            raise ValueError(f"margin_chunks must be >= 0, got {self.margin_chunks}")

    @classmethod
    def monotone(
        cls, points: list[tuple[int, int]], chunk_size: int, source: str, margin_chunks: int = 0
    ) -> WorkspaceTable:
        """The table of ``points`` (sorted by tokens), each byte count raised to the
        largest before it: noise never makes a bigger step cheaper."""
        out: list[tuple[int, int]] = []
        top = 0
        for t, b in sorted(points):
            top = max(top, b)
            out.append((t, top))
        return cls(tuple(out), chunk_size, source, margin_chunks)

    @property
    def max_tokens(self) -> int:
        return self.points[-1][0]

    def bytes_for(self, tokens: int) -> int:
        """The workspace of a step of ``tokens`` tokens: 0 for none, the first point's
        below it, linear between points (rounded up)."""
        if tokens < 0 or tokens > self.max_tokens:
            raise ValueError(f"{tokens} tokens is outside the table's [0, {self.max_tokens}]")
        if tokens == 0:
            return 0
        prev_t, prev_b = self.points[0]
        if tokens <= prev_t:
            return prev_b
        for t, b in self.points[1:]:
            if tokens <= t:
                return prev_b + math.ceil((b - prev_b) * (tokens - prev_t) / (t - prev_t))
            prev_t, prev_b = t, b
        raise AssertionError("unreachable: tokens <= max_tokens")

    def chunks_for(self, tokens: int) -> int:
        """``bytes_for`` in whole chunks, rounded up, plus the margin (0 for no tokens)."""
        if tokens == 0:
            return 0
        return -(-self.bytes_for(tokens) // self.chunk_size) + self.margin_chunks

    def max_tokens_within(self, chunks: int) -> int:
        """The most tokens a step may have for its workspace to fit ``chunks`` (0 if
        even one token does not fit). Binary search: ``chunks_for`` is monotone."""
        lo, hi = 0, self.max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.chunks_for(mid) <= chunks:
                lo = mid
            else:
                hi = mid - 1
        return lo


def doubling_points(max_tokens: int) -> list[int]:
    """1, 2, 4, ... and ``max_tokens`` itself: the token counts warm-up measures."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out, t = [], 1
    while t < max_tokens:
        out.append(t)
        t *= 2
    out.append(max_tokens)
    return out
