"""The KV manager with the prefix cache, its commands applied to a real arena on a host
pool, under random admit/compute/offer/release/premap/evict/reset sequences.

Requests draw tokens from a tiny alphabet, so prefixes are shared often. Each
computed token's KV is a stamp written into the arena: a function of the tokens
up to it (as real KV is). A request that hits the cache must read, through its
own slot, exactly the stamps of its prefix: the shared chunks are the right
ones. After every step: the pool balances, no chunk is both free and referenced,
every chunk's reference count is its mappings plus one if the cache holds it,
and the manager's and the cache's own invariants hold.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.layout import KVLayout
from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.memory import ChunkPool, open_backend

CHUNK = 4096
TPC = 8  # 1 layer x K,V x 1 head x 64 dims x fp32 = 512 bytes per token
SLOTS, MAX_TOKENS, CAPACITY = 5, 48, 14
# Prompts are a prefix of one of a few conversations plus a random tail, so that
# they share whole blocks often (as chats and system prompts do).
_rng = random.Random(12)
BASES = [[_rng.randrange(2) for _ in range(MAX_TOKENS)] for _ in range(3)]
tokens_st = st.builds(
    lambda b, n, tail: (BASES[b][:n] + tail) or [0],
    st.integers(0, len(BASES) - 1),
    st.integers(0, MAX_TOKENS),
    st.lists(st.integers(0, 1), max_size=12),
)


def stamp(prefix: list[int]) -> float:
    """The 'KV' of the last token of ``prefix``: exact in fp32 (below 2**24)."""
    digest = hashlib.blake2b(bytes(prefix), digest_size=3).digest()
    return float(int.from_bytes(digest, "little"))


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = open_backend("host", chunk_size=CHUNK)
        self.pool = ChunkPool(self.backend, CAPACITY * CHUNK)
        layout = KVLayout(SLOTS, MAX_TOKENS, 1, 1, 64, torch.float32)
        self.arena = KVArena(layout, self.pool, torch.device("cpu"))
        geo = self.arena.geometry
        self.kv = KVCacheManager(geo, prefix_cache=RadixPrefixCache(*geo.cache_block()))
        self.reqs: dict[int, dict[str, Any]] = {}  # rid -> tokens, computed
        self.next_rid = 0

    def _apply(self) -> None:
        self.arena.apply(self.kv.take_commands())
        self.arena.wait_all()

    def _compute(self, rid: int, start: int, end: int) -> None:
        """Write the stamps of positions [start, end), as a forward step would."""
        self.kv.check_writes([(rid, start, end)])
        self._apply()
        req, slot = self.reqs[rid], self.kv.slots.slot_of(rid)
        for p in range(start, end):
            self.arena.tensor[slot, p, 0, 0, 0, 0] = stamp(req["tokens"][: p + 1])
        req["computed"] = end

    def _check_stamps(self, rid: int, end: int) -> None:
        req, slot = self.reqs[rid], self.kv.slots.slot_of(rid)
        got = self.arena.tensor[slot, :end, 0, 0, 0, 0].tolist()
        assert got == [stamp(req["tokens"][: p + 1]) for p in range(end)], "wrong shared KV"

    @rule(ids=tokens_st, part=st.integers(1, 40))
    def admit(self, ids: list[int], part: int) -> None:
        ids = ids[: MAX_TOKENS - 1]
        hit = self.kv.match(ids, len(ids) - 1)
        assert hit.tokens % TPC == 0 and hit.tokens < len(ids)
        end = min(len(ids), hit.tokens + part)
        rid = self.next_rid
        evicted = self.kv.evicted_chunks
        if self.kv.admit(rid, end, hit) is None:
            assert not self.kv.can_admit(end, 0, hit)
            return
        self.next_rid += 1
        event(f"admitted with a hit of {hit.tokens // TPC} blocks")
        if self.kv.evicted_chunks > evicted:
            event("the admission evicted cache blocks (in place or to free chunks)")
        self.reqs[rid] = {"tokens": list(ids), "computed": hit.tokens}
        self._apply()
        self._check_stamps(rid, hit.tokens)  # the hit's KV, read through this slot
        self._compute(rid, hit.tokens, end)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), more=st.lists(st.integers(0, 1), max_size=12))
    def grow(self, data: st.DataObject, more: list[int]) -> None:
        """The request computes more of its tokens (a prompt span, or decoded ones)."""
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs[rid]
        req["tokens"] = (req["tokens"] + more)[:MAX_TOKENS]
        end = min(len(req["tokens"]), req["computed"] + data.draw(st.integers(1, 16)))
        if end > req["computed"] and self.kv.grow(rid, end):
            self._compute(rid, req["computed"], end)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def offer(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs[rid]
        self.kv.cache_tokens(rid, req["tokens"], req["computed"])

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), offer=st.booleans())
    def release(self, data: st.DataObject, offer: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs.pop(rid)
        if offer:
            self.kv.cache_tokens(rid, req["tokens"], req["computed"])
        self.kv.release(rid)

    @rule(ids=tokens_st)
    def premap(self, ids: list[int]) -> None:
        ids = ids[: MAX_TOKENS - 1]
        self.kv.premap([len(ids)], hits=[self.kv.match(ids, len(ids) - 1)])

    @rule(n=st.integers(1, 6))
    def evict(self, n: int) -> None:
        before = self.kv.usage().committed_chunks
        freed = self.kv.evict(n)
        event(f"evict freed {min(freed, 2)}+ chunks")
        assert self.kv.usage().committed_chunks == before - freed

    @rule()
    def reset(self) -> None:
        assert self.kv.reset_prefix_cache() == (not self.reqs)
        if not self.reqs:
            assert self.kv.usage().committed_chunks == 0

    @invariant()
    def books_match_the_pool(self) -> None:
        self._apply()
        self.kv.check()
        s = self.pool.stats()
        assert s.balanced and s.in_use == self.kv.usage().committed_chunks
        assert s.references == self.arena.vt.mapped_chunks + len(self.arena.held)
        free = {c.cid for c in self.pool._free}
        books = self.kv.books
        for slot in range(SLOTS):
            for i, cid in enumerate(self.kv.slot_table(slot)):
                chunk = self.arena.chunk_at(slot, i)
                assert chunk.cid not in free, "a chunk is both free and mapped"
                want = len(books.holders(cid)) + books.is_cached(cid)
                assert self.pool.refcount(chunk) == want
        assert set(self.arena.held) == books.cached_ids()
        for cid, chunk in self.arena.held.items():
            assert chunk.cid not in free and self.pool.refcount(chunk) >= 1
            assert self.pool.refcount(chunk) == len(books.holders(cid)) + 1

    def teardown(self) -> None:
        for rid in list(self.reqs):
            self.kv.release(rid)
        assert self.kv.reset_prefix_cache()
        self._apply()
        assert self.pool.stats().in_use == 0 and not self.arena.held
        self.arena.close()
        self.pool.close()
        self.backend.close()


ManagerMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
TestManagerMachine = ManagerMachine.TestCase
