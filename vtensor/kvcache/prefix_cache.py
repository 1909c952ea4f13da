"""The prefix cache contract: token prefixes whose KV stays in shared physical chunks.

Torch-free, like the KV manager. The cache never touches memory: it keeps the KV
manager's logical chunk ids (plain ints) in a tree keyed by token ids, and the
manager turns what the cache adopts or drops into KV commands that take or
release the pool reference of each chunk (``CacheHoldCommand``,
``CacheDropCommand``).

The unit is a **block**: ``block_tokens`` tokens at a block-aligned position,
whose KV fills ``block_chunks`` whole chunks (``KVGeometry.cache_block``): one
chunk of 16 tokens for Llama-3-8B. Positions are the same in every request that
shares a block, so its KV (rope-rotated K included) is valid as it is.

Contract of a :class:`PrefixCache`:

* ``match(tokens, max_tokens)``: the longest cached prefix of ``tokens`` in whole
  blocks, at most ``max_tokens`` tokens; it refreshes the blocks' recency and
  changes nothing else. The result is valid until the cache changes.
* ``insert(path, tokens, chunks, num_blocks)``: offers blocks ``[path.blocks,
  num_blocks)`` of ``tokens``, continuing from ``path`` (the end of a prefix the
  caller already holds, or the root), with ``chunks[i]`` the chunk id at chunk
  index ``i``. A block already cached keeps its own chunks; a missing one is
  created holding the offered chunks, which the cache then *adopts* (one
  reference each, until it drops them).
* ``lock(path, base)`` / ``unlock(path)``: a locked block, and every block it
  extends, is never evicted. ``lock`` locks the blocks of ``path`` below ``base``
  (``base`` is the root, or the caller's own locked path that ``path`` extends);
  ``unlock`` unlocks all of ``path``. Both return the chunk ids whose blocks
  changed state (locked from unlocked, or back).
* ``evict()``: removes the least recently used unlocked block with no
  extension (a leaf); returns its chunk ids, or None when nothing is evictable.
  ``evict_block(chunk)`` removes the block that holds chunk id ``chunk`` instead,
  if it is an unlocked leaf (False, nothing done, otherwise).
* ``reset()``: removes every block and returns their chunk ids; it refuses
  (``RuntimeError``) while any block is locked.

With a host tier (``radix_spill.py``; off otherwise, and these do nothing) an
evicted block may be *spilled* instead of dropped: ``evict`` still returns its
chunk ids (they leave the GPU), but the block stays in the tree on the host and
``take_spills`` names the copies to make before those chunks are dropped. A
``match`` may then end with ``restore`` host blocks (counted in ``tokens``, not in
``chunks``); ``restore(path, chunks)`` gives those blocks the fresh chunks the
caller mapped at their indices and returns the host extents to copy back in.
``free_host(slots)`` drops least recently used host blocks until the tier has
``slots`` free (swap-out takes precedence over spilled prefixes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from .host_tier import HostExtent


@dataclass(frozen=True)
class CachePath:
    """The end of a cached prefix: an opaque node of the cache (None: the root) and
    the number of blocks from the root to it."""

    node: object | None
    blocks: int


ROOT = CachePath(None, 0)


@dataclass(frozen=True)
class PrefixMatch:
    """A cached prefix: ``tokens`` tokens whose KV lies in ``chunks`` (in chunk order)."""

    path: CachePath
    tokens: int
    chunks: tuple[int, ...]
    restore: int = 0  # host blocks at the end of the path (in ``tokens``, not ``chunks``)


NO_MATCH = PrefixMatch(ROOT, 0, ())


@dataclass(frozen=True)
class CacheInsert:
    """What an insert did: where the offered prefix now ends, and the block indices
    whose offered chunks the cache adopted."""

    path: CachePath
    adopted: tuple[int, ...]


@dataclass(frozen=True)
class PrefixCacheStats:
    blocks: int  # cached blocks (tree nodes, on the GPU or the host)
    cached_chunks: int  # chunks the cache holds a reference to
    evictable_chunks: int  # in unlocked blocks
    evicted_blocks: int  # evicted from the GPU (spilled or dropped), over the cache's life
    host_blocks: int = 0  # blocks on the host tier now (spilled, copies in flight included)
    spilled_blocks: int = 0  # over the cache's life
    restored_blocks: int = 0  # over the cache's life
    host_dropped_blocks: int = 0  # host blocks dropped to make room, over the cache's life


@dataclass(frozen=True)
class SpillOut:
    """A spilled block's copy to make: ``chunks`` (still held until the cache's drop
    command for them is applied) to the host slots of tier key ``key``."""

    key: int
    chunks: tuple[int, ...]


class PrefixCache(ABC):
    """See the module docstring for the contract."""

    block_tokens: int
    block_chunks: int

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """False for the no-op cache: the manager then skips the cache entirely."""

    @abstractmethod
    def match(self, tokens: Sequence[int], max_tokens: int) -> PrefixMatch: ...

    @abstractmethod
    def insert(
        self, path: CachePath, tokens: Sequence[int], chunks: Sequence[int], num_blocks: int
    ) -> CacheInsert: ...

    @abstractmethod
    def lock(self, path: CachePath, base: CachePath = ROOT) -> list[int]: ...

    @abstractmethod
    def unlock(self, path: CachePath) -> list[int]: ...

    @abstractmethod
    def evict(self) -> tuple[int, ...] | None: ...

    @abstractmethod
    def evict_block(self, chunk: int) -> bool: ...

    @abstractmethod
    def last_use(self, chunk: int) -> int:
        """When the block starting with ``chunk`` was last matched or inserted, on the
        cache's logical clock (LRU order); -1 if no cached block starts with it."""

    @abstractmethod
    def reset(self) -> list[int]: ...

    @abstractmethod
    def stats(self) -> PrefixCacheStats: ...

    @abstractmethod
    def chunk_ids(self) -> set[int]:
        """Every chunk id the cache holds (integrity checks)."""

    @abstractmethod
    def locked_chunk_ids(self) -> set[int]:
        """The chunk ids of locked blocks (integrity checks)."""

    @abstractmethod
    def violations(self) -> list[str]:
        """The cache's broken invariants, described; empty when consistent."""

    # Spill to a host tier: a cache without one has no host block (these defaults).
    def restore(self, path: CachePath, chunks: Sequence[int]) -> list[HostExtent]:
        """Give the host blocks ending ``path`` the chunk ids ``chunks`` (in order);
        returns their host extents (``host_tier.HostExtent``) to copy in."""
        if chunks:
            raise ValueError("this prefix cache holds no host block to restore")
        return []

    def free_host(self, slots: int) -> int:
        """Drop host blocks until the host tier has ``slots`` free; returns slots freed."""
        return 0

    def take_spills(self) -> list[SpillOut]:
        """The copies of blocks spilled since the last take, in eviction order."""
        return []


def check_blocks(cache: PrefixCache, block: tuple[int, int]) -> None:
    """Raise ValueError unless an enabled ``cache``'s blocks are ``block``: the
    geometry's ``(tokens, chunks)`` (``KVGeometry.cache_block``)."""
    if cache.enabled and block != (cache.block_tokens, cache.block_chunks):
        raise ValueError(f"the cache's blocks must be {block} (tokens, chunks)")


class NoPrefixCache(PrefixCache):
    """The "off" setting: nothing is ever cached or matched."""

    block_tokens = 0
    block_chunks = 0

    @property
    def enabled(self) -> bool:
        return False

    def match(self, tokens: Sequence[int], max_tokens: int) -> PrefixMatch:
        return NO_MATCH

    def insert(
        self, path: CachePath, tokens: Sequence[int], chunks: Sequence[int], num_blocks: int
    ) -> CacheInsert:
        return CacheInsert(path, ())

    def lock(self, path: CachePath, base: CachePath = ROOT) -> list[int]:
        return []

    def unlock(self, path: CachePath) -> list[int]:
        return []

    def evict(self) -> tuple[int, ...] | None:
        return None

    def evict_block(self, chunk: int) -> bool:
        return False

    def last_use(self, chunk: int) -> int:
        return -1

    def reset(self) -> list[int]:
        return []

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(0, 0, 0, 0)

    def chunk_ids(self) -> set[int]:
        return set()

    def locked_chunk_ids(self) -> set[int]:
        return set()

    def violations(self) -> list[str]:
        return []
