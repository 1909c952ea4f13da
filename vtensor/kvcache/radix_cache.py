"""RadixPrefixCache: a tree of blocks keyed by their token ids, LRU eviction of leaves.

Each node is one block (``block_tokens`` tokens, ``block_chunks`` chunk ids); its
children are keyed by the next block's tokens, so a root-to-node path is a cached
prefix. It is a radix tree of radix one block: no path compression, because a
node is the unit that is shared, locked and evicted (one physical chunk on
Llama-3-8B). Keys are the token tuples themselves: a match is exact.

Invariants (listed by ``violations``):

* ``lock`` of a node counts the locked paths through it, so a parent's is at
  least each child's; a locked node is never evicted, so neither is any node a
  locked path extends;
* only an unlocked leaf is evicted, least recently used first (a logical clock:
  ``match`` and ``insert`` touch the nodes they walk, ``unlock`` the path it
  frees); the eviction heap is lazy, entries are checked when popped;
* chunk ids are distinct across nodes; ``cached == evictable + locked`` chunks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

from .prefix_cache import (
    NO_MATCH,
    ROOT,
    CacheInsert,
    CachePath,
    PrefixCache,
    PrefixCacheStats,
    PrefixMatch,
)


class _Node:
    __slots__ = ("alive", "children", "chunks", "host", "index", "key", "lock", "parent", "tick")

    def __init__(
        self, key: tuple[int, ...], chunks: tuple[int, ...], parent: _Node | None, index: int = 0
    ):
        self.key = key
        self.chunks = chunks  # () while on the host (``radix_spill.py``)
        self.host: int | None = None  # the host tier key while on the host
        self.index = index  # its first chunk index (the same in every slot)
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.lock = 0
        self.tick = 0
        self.alive = True


class RadixPrefixCache(PrefixCache):
    def __init__(self, block_tokens: int, block_chunks: int) -> None:
        if block_tokens < 1 or block_chunks < 1:
            raise ValueError("a cache block needs at least one token and one chunk")
        self.block_tokens = block_tokens
        self.block_chunks = block_chunks
        self._root = _Node((), (), None)
        self._clock = itertools.count(1)
        self._serial = itertools.count()  # tie-breaker: heap entries never compare nodes
        self._heap: list[tuple[int, int, _Node]] = []  # (tick, serial, leaf) candidates
        self._nodes = 0
        self._by_chunk: dict[int, _Node] = {}  # first chunk id -> its node
        self._evictable = 0  # chunks in unlocked nodes
        self._locked = 0  # chunks in locked nodes
        self._evicted = 0

    @property
    def enabled(self) -> bool:
        return True

    # ------------------------------------------------------------- lookups
    def match(self, tokens: Sequence[int], max_tokens: int) -> PrefixMatch:
        t = self.block_tokens
        node, tick = self._root, next(self._clock)
        chunks: list[int] = []
        for j in range(max(0, min(max_tokens, len(tokens))) // t):
            child = node.children.get(tuple(tokens[j * t : (j + 1) * t]))
            if child is None:
                break
            node = child
            node.tick = tick
            chunks.extend(node.chunks)
        if node is self._root:
            return NO_MATCH
        self._push_if_evictable(node)
        blocks = len(chunks) // self.block_chunks
        return PrefixMatch(CachePath(node, blocks), blocks * t, tuple(chunks))

    def insert(
        self, path: CachePath, tokens: Sequence[int], chunks: Sequence[int], num_blocks: int
    ) -> CacheInsert:
        t, c = self.block_tokens, self.block_chunks
        node = self._node(path)
        adopted: list[int] = []
        tick = next(self._clock)
        for j in range(path.blocks, num_blocks):
            key = tuple(tokens[j * t : (j + 1) * t])
            child = node.children.get(key)
            if child is None:
                child = _Node(key, tuple(chunks[j * c : (j + 1) * c]), node, j * c)
                if len(child.key) != t or len(child.chunks) != c:
                    raise ValueError(f"block {j} is not whole: {len(key)} tokens")
                node.children[key] = child
                self._by_chunk[child.chunks[0]] = child
                self._nodes += 1
                self._evictable += c
                adopted.append(j)
            elif child.host is not None:  # spilled: the offered chunks hold the same KV
                self._reinstate(child, tuple(chunks[j * c : (j + 1) * c]))
                adopted.append(j)
            node = child
            node.tick = tick
        self._push_if_evictable(node)
        end = path if node is self._node(path) else CachePath(node, num_blocks)
        return CacheInsert(end, tuple(adopted))

    # --------------------------------------------------------------- locks
    def lock(self, path: CachePath, base: CachePath = ROOT) -> list[int]:
        stop = self._node(base)
        changed: list[int] = []
        node = self._node(path)
        while node is not stop:
            if node.parent is None:
                raise ValueError("lock: base is not an ancestor of path")
            node.lock += 1
            if node.lock == 1:
                changed.extend(node.chunks)
                self._evictable -= len(node.chunks)
                self._locked += len(node.chunks)
            node = node.parent
        return changed

    def unlock(self, path: CachePath) -> list[int]:
        changed: list[int] = []
        node = self._node(path)
        tick = next(self._clock)
        while node.parent is not None:
            if node.lock < 1:
                raise RuntimeError("unlock of a path that is not locked")
            node.lock -= 1
            node.tick = tick
            if node.lock == 0:
                changed.extend(node.chunks)
                self._evictable += len(node.chunks)
                self._locked -= len(node.chunks)
                self._push_if_evictable(node)
            node = node.parent
        return changed

    # ------------------------------------------------------------ eviction
    def evict(self) -> tuple[int, ...] | None:
        node = self._lru_leaf()
        if node is None:
            return None
        heapq.heappop(self._heap)
        self._remove(node)
        return node.chunks

    def evict_block(self, chunk: int) -> bool:
        node = self._by_chunk.get(chunk)
        if node is None or node.lock or node.children:
            return False
        self._remove(node)  # its heap entry goes stale
        return True

    def last_use(self, chunk: int) -> int:
        node = self._by_chunk.get(chunk)
        return -1 if node is None else node.tick

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        if node.chunks:
            del self._by_chunk[node.chunks[0]]
            self._evictable -= len(node.chunks)
            self._evicted += 1
        node.alive = False
        self._nodes -= 1
        self._push_if_evictable(parent)

    def _reinstate(self, node: _Node, chunks: tuple[int, ...]) -> None:
        """A host-resident node takes GPU chunks again (only ``radix_spill.py`` has any)."""
        raise AssertionError("a radix cache without a host tier has no host-resident node")

    def _lru_leaf(self) -> _Node | None:
        """The heap's top once stale entries (locked, extended, touched again or gone
        since pushed) are dropped: the least recently used evictable leaf."""
        heap = self._heap
        while heap:
            tick, _, node = heap[0]
            if node.alive and self._gpu_leaf(node) and node.tick == tick:
                return node
            heapq.heappop(heap)
        return None

    def reset(self) -> list[int]:
        if self._locked:
            raise RuntimeError(f"cannot reset the prefix cache: {self._locked} chunks are locked")
        ids = [i for node in self._walk() for i in node.chunks]
        for node in self._walk():
            node.alive = False
        self._root.children.clear()
        self._by_chunk.clear()
        self._heap.clear()
        self._nodes = self._evictable = 0
        return ids

    # ---------------------------------------------------------------- state
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self._nodes, self._evictable + self._locked, self._evictable, self._evicted
        )

    def chunk_ids(self) -> set[int]:
        return {i for node in self._walk() for i in node.chunks}

    def locked_chunk_ids(self) -> set[int]:
        return {i for node in self._walk() if node.lock for i in node.chunks}

    def violations(self) -> list[str]:
        nodes = list(self._walk())
        ids = [i for n in nodes for i in n.chunks]
        locked = sum(len(n.chunks) for n in nodes if n.lock)
        checks = [
            (len(nodes) == self._nodes, f"{len(nodes)} nodes, counted {self._nodes}"),
            ({n.chunks[0]: n for n in nodes if n.chunks} == self._by_chunk,
             "the chunk index is stale"),
            (len(ids) == len(set(ids)), "a chunk id is held by two blocks"),
            (locked == self._locked, f"{locked} locked chunks, counted {self._locked}"),
            (len(ids) == self._evictable + self._locked, "cached != evictable + locked"),
            (all(n.lock <= n.parent.lock for n in nodes if n.parent and n.parent.parent),
             "a node is locked more than its parent"),
            (all(n.alive and len(n.key) == self.block_tokens and
                 len(n.chunks) == (0 if n.host is not None else self.block_chunks)
                 for n in nodes), "a node is not whole"),
        ]  # fmt: skip
        return [f"prefix cache: {what}" for ok, what in checks if not ok]

    # -------------------------------------------------------------- private
    def _node(self, path: CachePath) -> _Node:
        node = self._root if path.node is None else path.node
        if not isinstance(node, _Node) or not node.alive:
            raise ValueError("a cache path whose node was evicted (it was not locked)")
        return node

    @staticmethod
    def _gpu_leaf(node: _Node) -> bool:
        """Evictable from the GPU: unlocked, GPU-resident, no GPU-resident child (a
        spilled child is not an extension on the GPU: ``radix_spill.py``)."""
        return (
            node.parent is not None
            and node.lock == 0
            and bool(node.chunks)
            and not any(ch.chunks for ch in node.children.values())
        )

    def _push_if_evictable(self, node: _Node) -> None:
        if self._gpu_leaf(node):
            heapq.heappush(self._heap, (node.tick, next(self._serial), node))
            if len(self._heap) > 4 * self._nodes + 64:
                self._compact()

    def _compact(self) -> None:
        """Drop stale heap entries: one per evictable leaf remains."""
        self._heap = [(n.tick, next(self._serial), n) for n in self._walk() if self._gpu_leaf(n)]
        heapq.heapify(self._heap)

    def _walk(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
