"""The write guard: a step writes KV only into chunks its request maps alone.

Cached chunks are read-only and shared, so a write there would corrupt another
request's (or the cache's) KV. The scheduler checks every span of every step
(``KVCacheManager.check_writes``) before the step is launched. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .chunk_books import ChunkBooks
from .geometry import KVGeometry


class SharedChunkWriteError(RuntimeError):
    """A step would write KV into a chunk its request does not map alone: a bug that
    would corrupt another request's (or the cache's) KV, so it is refused."""


def check_writes(
    books: ChunkBooks,
    owner: Mapping[int, int],
    geometry: KVGeometry,
    writes: Iterable[tuple[int, int, int]],
) -> None:
    """Raise :class:`SharedChunkWriteError` unless each ``(rid, start, end)`` (a step's
    span: it writes the KV of tokens ``[start, end)``) touches only chunks that its
    request's slot (``owner[rid]``) maps alone."""
    bpt, chunk = geometry.bytes_per_token, geometry.chunk_size
    cached_end = books.cached_end
    for rid, start, end in writes:  # every span of every step: kept lean
        slot = owner[rid]
        table = books.tables[slot]
        first, last = start * bpt // chunk, -(-end * bpt // chunk)
        if last > len(table):
            raise SharedChunkWriteError(
                f"request {rid} writes tokens [{start}, {end}) beyond its {len(table)} chunks"
            )
        if first >= cached_end[slot]:
            continue  # everything from cached_end on is private
        shared = [i for i in range(first, last) if not books.is_private(table[i])]
        if shared:
            raise SharedChunkWriteError(
                f"request {rid} would write tokens [{start}, {end}) into shared or cached "
                f"chunk(s) at indices {shared[:8]} of slot {slot}"
            )
