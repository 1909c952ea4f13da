"""A swapped request's chunks, the GPU side: which ones a swap copies, giving them
back, and mapping fresh ones at the same indices (torch-free).

The host side (which host slot holds which chunk) is ``host_tier.py``. Here, in
the KV manager's books: a request's slot maps ``[0, end)`` chunks; a swap copies
only its *private tail* ``[first, end)``, the chunks after its last shared one.
The front ``[0, first)`` ends with a chunk the prefix cache holds (shared,
read-only) and needs no copy: it stays mapped and pinned (the request still asks
for it and keeps its cache blocks locked while swapped), so it is there at its
resume. A private chunk inside the front stays mapped too (rare: the simple
rule keeps the front whole).

The request keeps its slot (owned, not idle) while swapped, so its fresh chunks
land at the same offsets of the same slot: no address or table changes.
"""

from __future__ import annotations

from .manager import KVCacheManager


def private_tail(kv: KVCacheManager, rid: int, tokens: int) -> tuple[int, int]:
    """``(first, end)``: chunks ``[first, end)`` of ``rid``'s first ``tokens`` tokens
    are its private tail, the ones a swap must copy; ``[0, first)`` end with a shared
    (cached) chunk, which needs no copy."""
    table, end = kv.slot_table(kv.slots.slot_of(rid)), kv.geometry.chunks_for(tokens)
    first = end
    while first > 0 and kv.books.is_private(table[first - 1]):
        first -= 1
    return first, end


def swap_out(kv: KVCacheManager, rid: int, first: int) -> None:
    """Unmap ``rid``'s chunks from ``first`` on (``private_tail``); the engine copies
    them to the host tier before it applies the unmap (the commands wait in the
    books until the step takes them)."""
    kv.shrink(rid, first)


def swap_in(kv: KVCacheManager, rid: int, tokens: int, headroom_chunks: int = 0) -> bool:
    """Map fresh chunks for a swapped-out ``rid`` up to ``tokens`` tokens, at the
    indices it had, if that leaves ``headroom_chunks`` available (as admission does;
    on a shared budget the lease may pull first). False: nothing changed."""
    need = kv.geometry.chunks_for(tokens) - kv.mapped_chunks(rid)
    cap = kv.capacity
    short = need + headroom_chunks - cap.available
    if short > 0 and cap.lease is not None:  # a shared budget: others may give some
        cap.lease.pull(short, reclaim=True)
    if need > cap.available - headroom_chunks:
        return False
    return kv.grow(rid, tokens)
