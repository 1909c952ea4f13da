"""RadixPrefixCache against a plain model of cached prefixes (torch-free).

Unit tests pin down match, insert, locks and LRU leaf eviction; a hypothesis
state machine runs random match/insert/lock/extend/unlock/evict/reset against a
dictionary model (prefix -> chunk ids, lock counts, recency ticks), checking
after every step that the cache holds exactly the model's chunks and that
every eviction takes the least recently used unlocked leaf.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vtensor.kvcache.prefix_cache import ROOT, CachePath, NoPrefixCache
from vtensor.kvcache.radix_cache import RadixPrefixCache


def ids_for(blocks: int, chunks: int, start: int) -> list[int]:
    return list(range(start, start + blocks * chunks))


def test_insert_then_match_shares_whole_blocks_only() -> None:
    cache = RadixPrefixCache(block_tokens=4, block_chunks=2)
    tokens = [random.randrange(100) for _ in range(13)]  # 3 whole blocks and a rest
    done = cache.insert(ROOT, tokens, ids_for(3, 2, 100), 3)
    assert done.adopted == (0, 1, 2) and done.path.blocks == 3
    hit = cache.match(tokens, len(tokens) - 1)
    assert (hit.tokens, hit.chunks) == (12, tuple(range(100, 106)))
    assert cache.match(tokens, 11).tokens == 8  # at most max_tokens, in whole blocks
    other = [*tokens[:6], tokens[6] + 1, *tokens[7:]]  # differs in block 1
    assert cache.match(other, 100).chunks == (100, 101)
    again = cache.insert(ROOT, other, ids_for(3, 2, 200), 3)
    assert again.adopted == (1, 2)  # block 0 was cached: its offered chunks are not taken
    assert cache.stats().cached_chunks == 10 and not cache.violations()


def test_locked_blocks_and_their_ancestors_are_never_evicted() -> None:
    cache = RadixPrefixCache(2, 1)
    a, b = [1, 1, 2, 2, 3, 3], [1, 1, 5, 5]
    pa = cache.insert(ROOT, a, [10, 11, 12], 3).path
    pb = cache.insert(ROOT, b, [20, 21], 2).path
    assert sorted(cache.lock(pa)) == [10, 11, 12]
    assert cache.evict() == (21,)  # b's own leaf; [1, 1] is a's ancestor, locked
    assert cache.evict() is None
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    assert sorted(cache.unlock(pa)) == [10, 11, 12]
    assert [cache.evict() for _ in range(3)] == [(12,), (11,), (10,)]  # leaves first
    assert cache.evict() is None and cache.stats().blocks == 0
    del pb


def test_eviction_is_least_recently_used_first() -> None:
    cache = RadixPrefixCache(2, 1)
    seqs = [[i, i] for i in range(5)]
    for i, s in enumerate(seqs):
        cache.insert(ROOT, s, [i], 1)
    cache.match(seqs[0], 2)  # 0 is now the most recently used
    assert [cache.evict() for _ in range(5)] == [(1,), (2,), (3,), (4,), (0,)]


def test_lock_extension_locks_only_the_new_blocks() -> None:
    cache = RadixPrefixCache(2, 1)
    tokens = [1, 2, 3, 4, 5, 6]
    first = cache.insert(ROOT, tokens, [7, 8, 9], 1).path
    assert cache.lock(first) == [7]
    longer = cache.insert(first, tokens, [7, 8, 9], 3).path
    assert sorted(cache.lock(longer, base=first)) == [8, 9]
    assert sorted(cache.unlock(longer)) == [7, 8, 9]  # one unlock of the whole path
    assert not cache.locked_chunk_ids() and not cache.violations()
    with pytest.raises(ValueError, match="ancestor"):
        cache.lock(first, base=longer)


def test_a_path_whose_node_was_evicted_is_refused() -> None:
    cache = RadixPrefixCache(2, 1)
    path = cache.insert(ROOT, [1, 2], [5], 1).path
    assert cache.evict() == (5,)
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(path)


def test_no_prefix_cache_caches_nothing() -> None:
    cache = NoPrefixCache()
    assert not cache.enabled
    assert cache.insert(ROOT, [1, 2, 3], [1], 1).adopted == ()
    assert cache.match([1, 2, 3], 2).tokens == 0 and cache.evict() is None
    assert cache.reset() == [] and cache.stats().cached_chunks == 0


# ---------------------------------------------------------------- state machine
T, C = 2, 2  # tokens and chunks per block: a small alphabet makes prefixes collide
Prefix = tuple[int, ...]
tokens_st = st.lists(st.integers(0, 1), min_size=0, max_size=4 * T + 1)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = RadixPrefixCache(T, C)
        self.ids = itertools.count()
        self.model: dict[Prefix, tuple[int, ...]] = {}  # whole-block prefix -> its chunks
        self.locks: dict[Prefix, int] = {}
        self.tick: dict[Prefix, int] = {}
        self.clock = itertools.count(1)
        self.held: list[tuple[CachePath, Prefix]] = []  # locked paths, as the manager's

    def _blocks(self, tokens: list[int], limit: int) -> list[Prefix]:
        return [tuple(tokens[: (j + 1) * T]) for j in range(min(limit, len(tokens)) // T)]

    def _touch(self, prefixes: list[Prefix]) -> None:
        t = next(self.clock)
        for p in prefixes:
            self.tick[p] = t

    @rule(tokens=tokens_st, limit=st.integers(0, 12))
    def match(self, tokens: list[int], limit: int) -> None:
        hit = self.cache.match(tokens, limit)
        found = list(itertools.takewhile(self.model.__contains__, self._blocks(tokens, limit)))
        assert hit.tokens == len(found) * T
        assert hit.chunks == tuple(c for p in found for c in self.model[p])
        if found:
            self._touch(found)

    @rule(tokens=tokens_st, lock=st.booleans())
    def insert(self, tokens: list[int], lock: bool) -> None:
        blocks = self._blocks(tokens, len(tokens))
        offered = [next(self.ids) for _ in range(len(blocks) * C)]
        done = self.cache.insert(ROOT, tokens, offered, len(blocks))
        adopted = tuple(j for j, p in enumerate(blocks) if p not in self.model)
        assert done.adopted == adopted
        for j in adopted:
            self.model[blocks[j]] = tuple(offered[j * C : (j + 1) * C])
        if blocks:
            self._touch(blocks)
        if lock and blocks:
            self._lock(done.path, blocks, ROOT, [])

    @precondition(lambda self: self.held)
    @rule(data=st.data(), more=st.lists(st.integers(0, 1), min_size=T, max_size=3 * T))
    def extend(self, data: st.DataObject, more: list[int]) -> None:
        """A lock holder inserts more blocks after its prefix and locks the extension."""
        i = data.draw(st.integers(0, len(self.held) - 1))
        path, prefix = self.held.pop(i)
        tokens = [*prefix, *more]
        blocks = self._blocks(tokens, len(tokens))
        offered = [next(self.ids) for _ in range(len(blocks) * C)]
        done = self.cache.insert(path, tokens, offered, len(blocks))
        for j, p in enumerate(blocks):
            if p not in self.model:
                assert j in done.adopted
                self.model[p] = tuple(offered[j * C : (j + 1) * C])
        self._touch(blocks[len(prefix) // T :])
        self._lock(done.path, blocks, path, blocks[: len(prefix) // T])

    def _lock(self, path: CachePath, blocks: list[Prefix], base: CachePath, had: list[Prefix]):
        changed = self.cache.lock(path, base)
        new = [p for p in blocks if p not in had]
        want = [c for p in new if self.locks.get(p, 0) == 0 for c in self.model[p]]
        assert sorted(changed) == sorted(want)
        for p in new:
            self.locks[p] = self.locks.get(p, 0) + 1
        self.held.append((path, blocks[-1]))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        path, prefix = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        on_path = [prefix[: (j + 1) * T] for j in range(len(prefix) // T)]
        changed = self.cache.unlock(path)
        freed = [p for p in on_path if self.locks[p] == 1]
        assert sorted(changed) == sorted(c for p in freed for c in self.model[p])
        for p in on_path:
            self.locks[p] -= 1
        self._touch(on_path)

    @rule()
    def evict(self) -> None:
        leaves = [
            p for p in self.model
            if not self.locks.get(p) and not any(len(q) > len(p) and q[: len(p)] == p
                                                 for q in self.model)
        ]  # fmt: skip
        got = self.cache.evict()
        if not leaves:
            assert got is None
            return
        oldest = min(leaves, key=lambda p: self.tick[p])
        assert got == self.model.pop(oldest), "not the least recently used unlocked leaf"

    @rule(data=st.data())
    def evict_block(self, data: st.DataObject) -> None:
        """Evict a chosen block (slot reuse in place): only an unlocked leaf goes."""
        if not self.model:
            return
        prefix = data.draw(st.sampled_from(sorted(self.model)))
        leaf = not any(len(q) > len(prefix) and q[: len(prefix)] == prefix for q in self.model)
        done = self.cache.evict_block(self.model[prefix][0])
        assert done == (leaf and not self.locks.get(prefix))
        if done:
            del self.model[prefix]

    @rule()
    def reset(self) -> None:
        if any(self.locks.values()):
            with pytest.raises(RuntimeError):
                self.cache.reset()
            return
        assert sorted(self.cache.reset()) == sorted(c for v in self.model.values() for c in v)
        self.model.clear()
        self.locks.clear()

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert not self.cache.violations()
        assert self.cache.chunk_ids() == {c for v in self.model.values() for c in v}
        locked = {c for p, n in self.locks.items() if n and p in self.model for c in self.model[p]}
        assert self.cache.locked_chunk_ids() == locked
        assert self.cache.stats().blocks == len(self.model)


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
