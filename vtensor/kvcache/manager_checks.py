"""The KV manager's invariants, each recomputed from scratch (``KVCacheManager.violations``).

Slow on purpose (it walks every slot table and the whole cache): for tests and
``LLMEngine.check_integrity``, never on the step path.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import KVCacheManager


def manager_violations(kv: KVCacheManager) -> list[str]:
    geo, books = kv.geometry, kv.books
    owned = list(kv.slots.owners().values())
    idle = kv.slots.idle_slots()
    tables = books.tables
    checks = [
        (books.committed <= kv.capacity_chunks, "committed > capacity (or lease grant)"),
        (len(set(owned)) == len(owned), "a slot is owned by two requests"),
        (idle.isdisjoint(owned), "a slot is both idle and owned"),
        (min([*owned, *idle], default=kv.reserved_slots) >= kv.reserved_slots,
         "a reserved slot is handed out"),
        (len(idle) + len(owned) == geo.num_slots - kv.reserved_slots,
         "slots lost: idle + owned != all unreserved slots"),
        (all(len(t) <= geo.chunks_per_slot for t in tables),
         "a slot maps more than its chunks"),
        (all(not tables[s] for s in range(kv.reserved_slots)), "a reserved slot has chunks"),
        (all(kv.slots.asked(s) == 0 for s in idle), "an idle slot has asked chunks"),
        (all(kv.slots.asked(s) <= len(tables[s]) for s in owned), "asked > mapped"),
    ]  # fmt: skip
    problems = [f"KV manager: {what}" for ok, what in checks if not ok]
    problems += books.violations(geo.num_slots)
    problems += kv.cache.violations()
    return [*problems, *_cache_problems(kv)]


def _cache_problems(kv: KVCacheManager) -> list[str]:
    """The cache and the books agree, and pins are what the owners and locks say."""
    books, cache = kv.books, kv.cache
    owners = kv.slots.owners()
    cached = {c for t in books.tables for c in t if books.is_cached(c)}
    held = cache.chunk_ids()
    locked = cache.locked_chunk_ids()
    pins: Counter[int] = Counter(locked)
    hard: set[int] = set()
    for slot in owners.values():
        ids = books.tables[slot][: kv.slots.asked(slot)]
        pins.update(ids)
        hard.update(ids)
    problems = []
    if books.cached_ids() != held or not cached <= held:
        problems.append(f"the books hold {books.cached_count} cached chunks, the cache {len(held)}")
    if dict(pins) != books.pin_counts():
        problems.append("pins differ from what running requests and locked blocks hold")
    if set(kv.links.paths) != set(owners):
        problems.append("a running request without a cache path, or a stale path")
    if not {c for c in hard if books.is_cached(c)} <= locked:
        problems.append("a running request maps a cached chunk whose block is not locked")
    surplus = {c for s in owners.values() for c in books.tables[s][kv.slots.asked(s) :]}
    if any(not books.is_private(c) for c in surplus):
        problems.append("a running slot's surplus holds a shared or cached chunk")
    return [f"KV manager: {p}" for p in problems]
