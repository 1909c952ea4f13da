"""Runs of consecutive integers: chunk indices turned into ranges, so that one mapper
op or one KV command covers each run. Torch-free and below every layer (``memory``
and ``kvcache`` both use it)."""

from __future__ import annotations

from collections.abc import Iterable


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ``indices`` as ``(first, count)`` runs of consecutive values."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
