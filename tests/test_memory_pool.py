"""ChunkPool: lazy creation, recycling, capacity changes, exact accounting."""

from __future__ import annotations

import pytest

from vtensor.memory import ChunkPool, PoolExhaustedError, VirtualTensor


def test_lazy_creation_and_recycling(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(8)
    assert pool.stats().created == 0  # nothing is created up front
    a = pool.acquire(3)
    assert pool.stats().created == 3
    pool.release(a)
    b = pool.acquire(2)
    s = pool.stats()
    assert (s.created, s.free, s.in_use) == (3, 1, 2)  # recycled, not recreated
    assert {c.cid for c in b} <= {c.cid for c in a}
    pool.release(b)


def test_refcounts_and_last_reference(pool: ChunkPool) -> None:
    (c,) = pool.acquire(1)
    pool.retain([c, c])
    assert pool.refcount(c) == 3
    pool.release([c])
    pool.release([c])
    assert pool.stats().in_use == 1
    pool.release([c])
    assert pool.refcount(c) == 0 and pool.stats().free == 1


def test_grow_and_shrink_capacity(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(4)
    cs = pool.chunk_size
    held = pool.acquire(4)
    with pytest.raises(PoolExhaustedError):
        pool.acquire(1)
    pool.set_capacity(6 * cs)  # grow at run time
    more = pool.acquire(2)
    pool.release(more)
    assert pool.stats().free == 2
    # Shrink below what is created: free chunks go back to the driver now...
    assert pool.set_capacity(3 * cs) == 2
    s = pool.stats()
    assert (s.created, s.free, s.in_use, s.capacity_chunks) == (4, 0, 4, 3)
    # ...and in-use chunks above the capacity are released when their last ref goes.
    pool.release(held[:2])
    s = pool.stats()
    assert (s.created, s.free, s.in_use) == (3, 1, 2)
    pool.release(held[2:])
    assert pool.stats().created == 3 and pool.stats().free == 3


def test_warm_and_trim(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(5)
    assert pool.warm(8) == 5  # bounded by capacity
    assert pool.stats().free == 5
    assert pool.trim(keep_free=2) == 3
    assert pool.stats().created == 2


def test_driver_failure_during_acquire_changes_nothing(make_pool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(8)
    pool.release(pool.acquire(2))  # two free chunks to reuse
    before = pool.stats()
    calls = {"n": 0}
    real = pool.backend.create_chunk

    def flaky():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("driver out of memory")
        return real()

    monkeypatch.setattr(pool.backend, "create_chunk", flaky)
    with pytest.raises(MemoryError):
        pool.acquire(5)
    assert pool.stats() == before


def test_close_refuses_leaks(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(4)
    vt = VirtualTensor(pool, 4 * pool.chunk_size)
    vt.map(0, pool.chunk_size)
    with pytest.raises(Exception, match="still in use"):
        pool.close()
    vt.close()
