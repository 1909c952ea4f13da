"""SpillRadixCache: the radix prefix cache over a host tier: evicted blocks spill.

Torch-free. When the GPU side evicts a block (least recently used leaf, as
``RadixPrefixCache`` does) and the host tier (``host_tier.py``, shared with swap)
has room, the block's node stays in the tree *on the host*: it loses its chunk
ids (they leave the GPU as before) and takes a host extent under a **spill key**
(a negative tier key: requests' ids are >= 0). A later ``match`` may walk on
through host nodes; ``restore`` gives them the fresh chunks the caller mapped at
their indices, and they are GPU blocks again (the engine copies the host slots
in before the step that reads them: ``engine/spill.py``).

Every block is in exactly one place:

* **GPU**: the node has chunks, no key (a restore's copy-in may be in flight:
  its extent is COPYING_IN until the engine's ``end_in``; the step that reads
  the chunks is ordered after the copy);
* **in flight out**: the node has a key whose extent is COPYING_OUT, from the
  eviction until the engine copied the chunks (``take_spills``) and called
  ``end_out``; ``match`` stops there (the copy has not happened yet);
* **host**: the key's extent is HOST; ``match`` may restore it.

Invariants (``violations``): a node has chunks or a key, never both; every
descendant of a host node is a host node (only GPU leaves spill, and a restore
walks down from a GPU node); a locked node is on the GPU; every key held by a
node is in the tier with ``block_chunks`` slots at the node's chunk index.

Room (the rule, also in docs/architecture.md): swap of running requests takes
precedence over spilled prefixes. A swap-out that finds the tier short drops
host blocks (``free_host``: least recently used host leaves, settled ones only)
before it gives up; a spill does the same, so newer prefixes replace older
ones. A spill that still finds no room drops the block, and its host
descendants with it (a host block is only reachable through its parent).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from .host_tier import HostExtent, HostTier, SwapState
from .prefix_cache import NO_MATCH, CachePath, PrefixCacheStats, PrefixMatch, SpillOut
from .radix_cache import RadixPrefixCache, _Node


class SpillRadixCache(RadixPrefixCache):
    def __init__(self, block_tokens: int, block_chunks: int, tier: HostTier) -> None:
        super().__init__(block_tokens, block_chunks)
        self.tier = tier
        self._keys = itertools.count(1)  # spill key -k: never reused, never a request id
        self._host: dict[int, _Node] = {}  # spill key -> its host node
        self._host_heap: list[tuple[int, int, _Node]] = []  # lazy, like the GPU heap
        self._spills: list[SpillOut] = []
        self._spilled = self._restored = self._host_dropped = 0

    # ------------------------------------------------------------- lookups
    def match(self, tokens: Sequence[int], max_tokens: int) -> PrefixMatch:
        """The longest prefix of GPU blocks, then of settled host blocks (a block whose
        copy-out is still in flight ends the match)."""
        t = self.block_tokens
        node, tick = self._root, next(self._clock)
        chunks: list[int] = []
        blocks = restore = 0
        for j in range(max(0, min(max_tokens, len(tokens))) // t):
            child = node.children.get(tuple(tokens[j * t : (j + 1) * t]))
            if child is None or not (child.chunks or self._settled(child)):
                break
            node, blocks = child, blocks + 1
            node.tick = tick
            if node.chunks:
                chunks.extend(node.chunks)
            else:
                restore += 1
                self._push_host(node)
        if node is self._root:
            return NO_MATCH
        gpu_end = node
        while gpu_end.host is not None:
            assert gpu_end.parent is not None
            gpu_end = gpu_end.parent
        self._push_if_evictable(gpu_end)
        return PrefixMatch(CachePath(node, blocks), blocks * t, tuple(chunks), restore)

    def restore(self, path: CachePath, chunks: Sequence[int]) -> list[HostExtent]:
        """See ``PrefixCache.restore``: the trailing host nodes of ``path`` take
        ``chunks`` and start their copy-in (the tier's ``begin_in``)."""
        nodes: list[_Node] = []
        node = self._node(path)
        while node.host is not None:
            nodes.append(node)
            assert node.parent is not None
            node = node.parent
        c = self.block_chunks
        if len(chunks) != len(nodes) * c:
            raise ValueError(f"{len(chunks)} chunks for {len(nodes)} host blocks of {c}")
        extents: list[HostExtent] = []
        for i, node in enumerate(reversed(nodes)):
            extents.append(self.tier.begin_in(self._unhost(node)))
            self._give_chunks(node, tuple(chunks[i * c : (i + 1) * c]))
            self._restored += 1
        return extents

    # ------------------------------------------------------------ eviction
    def evict(self) -> tuple[int, ...] | None:
        """Evict the least recently used GPU leaf: spilled to the host tier if it has
        room (made by dropping older host blocks), else dropped with its host subtree.
        Either way its chunk ids leave the GPU."""
        node = self._lru_leaf()
        if node is None:
            return None
        heapq.heappop(self._heap)
        ids = node.chunks
        self._spill_or_drop(node)
        return ids

    def evict_block(self, chunk: int) -> bool:
        """As ``evict``, for the block starting with ``chunk`` (slot placement reuses its
        chunks in place: the spill's copy runs before the drop, so before any write)."""
        node = self._by_chunk.get(chunk)
        if node is None or not self._gpu_leaf(node):
            return False
        self._spill_or_drop(node)  # its heap entry goes stale
        return True

    def _spill_or_drop(self, node: _Node) -> None:
        ids = node.chunks
        key = -next(self._keys)
        ext = self.tier.begin_out(key, node.index, len(ids))
        if ext is None and self.free_host(len(ids)):
            ext = self.tier.begin_out(key, node.index, len(ids))
        if ext is None:
            self._drop_subtree(node)
            self._remove(node)
            return
        del self._by_chunk[ids[0]]
        node.chunks, node.host = (), key
        self._host[key] = node
        self._evictable -= len(ids)
        self._evicted += 1
        self._spilled += 1
        self._spills.append(SpillOut(key, ids))
        self._push_host(node)
        assert node.parent is not None
        self._push_if_evictable(node.parent)

    def free_host(self, slots: int) -> int:
        """Drop least recently used host leaves until the tier has ``slots`` free; nothing
        is dropped unless that is reachable (settled host blocks are all droppable,
        leaves first)."""
        settled = sum(1 for n in self._host.values() if n.lock == 0 and self._settled(n))
        if self._free_slots() + settled * self.block_chunks < slots:
            return 0
        freed = 0
        while self._free_slots() < slots:
            node = self._host_leaf()
            if node is None:
                break
            heapq.heappop(self._host_heap)
            freed += self.block_chunks
            self._host_dropped += 1
            self.tier.drop(self._unhost(node))
            self._remove(node)
            parent = node.parent
            if parent is not None and parent.host is not None:
                self._push_host(parent)  # a host leaf now
        return freed

    def take_spills(self) -> list[SpillOut]:
        spills, self._spills = self._spills, []
        return spills

    def reset(self) -> list[int]:
        ids = super().reset()  # refuses while locked, before anything changes
        for key in self._host:
            self.tier.drop(key)
        self._host.clear()
        self._host_heap.clear()
        self._spills.clear()  # their chunks were dropped already; nothing to copy
        return ids

    # ---------------------------------------------------------------- state
    def stats(self) -> PrefixCacheStats:
        base = super().stats()
        return PrefixCacheStats(
            base.blocks,
            base.cached_chunks,
            base.evictable_chunks,
            base.evicted_blocks,
            len(self._host),
            self._spilled,
            self._restored,
            self._host_dropped,
        )

    def violations(self) -> list[str]:
        nodes = list(self._walk())
        host = [n for n in nodes if n.host is not None]
        c = self.block_chunks
        checks = [
            (all(bool(n.chunks) != (n.host is not None) for n in nodes),
             "a node has both chunks and a host key, or neither"),
            ({n.host: n for n in host} == self._host, "the host index is stale"),
            (all(ch.host is not None for n in host for ch in n.children.values()),
             "a GPU block extends a host block"),
            (all(n.lock == 0 for n in host), "a host block is locked"),
            (all(self._extent_ok(n, c) for n in host), "a host block's extent is wrong"),
        ]  # fmt: skip
        problems = [f"prefix cache: {what}" for ok, what in checks if not ok]
        return super().violations() + problems

    # -------------------------------------------------------------- private
    def _reinstate(self, node: _Node, chunks: tuple[int, ...]) -> None:
        """An insert offers a host block's tokens again (computed by a request that
        missed it): it takes the offered chunks and its host copy is dropped (a copy-out
        still pending is skipped: the engine copies only keys still in the tier)."""
        self.tier.drop(self._unhost(node))
        self._give_chunks(node, chunks)

    def _unhost(self, node: _Node) -> int:
        key = node.host
        assert key is not None
        del self._host[key]
        node.host = None
        return key

    def _give_chunks(self, node: _Node, chunks: tuple[int, ...]) -> None:
        node.chunks = chunks
        self._by_chunk[chunks[0]] = node
        if node.lock:
            self._locked += len(chunks)
        else:
            self._evictable += len(chunks)
            self._push_if_evictable(node)

    def _drop_subtree(self, node: _Node) -> None:
        """Drop every host descendant of ``node`` (it is being removed)."""
        stack = list(node.children.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            self.tier.drop(self._unhost(n))
            n.alive = False
            self._nodes -= 1
            self._host_dropped += 1
        node.children.clear()

    def _settled(self, node: _Node) -> bool:
        ext = None if node.host is None else self.tier.extent(node.host)
        return ext is not None and ext.state is SwapState.HOST

    def _free_slots(self) -> int:
        usage = self.tier.usage()
        return usage.capacity_slots - usage.used_slots

    def _push_host(self, node: _Node) -> None:
        if not node.children:
            heapq.heappush(self._host_heap, (node.tick, next(self._serial), node))
            if len(self._host_heap) > 4 * len(self._host) + 64:
                self._host_heap = [
                    (n.tick, next(self._serial), n) for n in self._host.values() if not n.children
                ]
                heapq.heapify(self._host_heap)

    def _host_leaf(self) -> _Node | None:
        """The least recently used settled, unlocked host leaf (locked: only inside an
        admission, between its lock and its restore). Entries of valid leaves that are
        not droppable yet (copy-out in flight, locked) are kept for later."""
        heap, later = self._host_heap, []
        found = None
        while heap:
            tick, _, node = heap[0]
            if node.alive and node.host is not None and not node.children and node.tick == tick:
                if node.lock == 0 and self._settled(node):
                    found = node
                    break
                later.append(heapq.heappop(heap))
                continue
            heapq.heappop(heap)
        for entry in later:
            heapq.heappush(heap, entry)
        return found

    def _extent_ok(self, node: _Node, c: int) -> bool:
        assert node.host is not None
        ext = self.tier.extent(node.host)
        return ext is not None and ext.count == c and ext.first == node.index
