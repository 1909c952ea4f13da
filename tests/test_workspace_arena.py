"""The pool-backed workspace (issue 19): ``WorkspaceArena`` on every backend (host in CI,
CUDA where a GPU is), and ``TorchWorkspace`` routing torch's allocations to it on CUDA.

The arena is checked against the pool it draws on: every allocation is whole fresh
chunks of that pool, freeing gives them back, an exhausted pool or range refuses with
nothing changed, and the fixture's leak check runs after every test.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
import torch

from vtensor.memory import ChunkPool, MappingError, PoolExhaustedError
from vtensor.memory.workspace_arena import WorkspaceArena


def held(pool: ChunkPool) -> int:
    return pool.stats().in_use


def test_allocations_are_whole_chunks_of_the_pool(make_pool: Callable[[int], ChunkPool]) -> None:
    pool = make_pool(16)
    chunk = pool.chunk_size
    arena = WorkspaceArena(pool, 16 * chunk)
    a = arena.allocate(1)  # one byte still takes a whole chunk
    b = arena.allocate(3 * chunk)
    c = arena.allocate(2 * chunk + 1)
    assert held(pool) == arena.held_chunks == 1 + 3 + 3
    assert [a, b, c] == [arena.va, arena.va + chunk, arena.va + 4 * chunk]
    view = pool.backend.byte_view(b, 3 * chunk)
    view.fill_(7)  # mapped and writable
    assert int(view[-1]) == 7
    arena.free(b)
    assert held(pool) == 4 and arena.stats().peak_chunks == 7
    d = arena.allocate(2 * chunk)  # first fit: the hole b left
    assert d == arena.va + chunk
    for address in (a, c, d):
        arena.free(address)
    assert held(pool) == 0
    s = arena.stats()
    assert (s.held_chunks, s.allocations, s.grows, s.frees) == (0, 0, 4, 4)
    arena.close()


def test_refusals_change_nothing(make_pool: Callable[[int], ChunkPool]) -> None:
    pool = make_pool(6)
    chunk = pool.chunk_size
    arena = WorkspaceArena(pool, 8 * chunk)
    kv = pool.acquire(2)  # the KV holds some of the pool
    a = arena.allocate(4 * chunk)
    with pytest.raises(PoolExhaustedError):
        arena.allocate(chunk)  # the pool is spent (the range is not)
    pool.release(kv)
    b = arena.allocate(2 * chunk)
    arena.free(a)
    with pytest.raises(PoolExhaustedError):
        arena.allocate(7 * chunk)  # the range has no free run of 7
    assert arena.stats().refused == 2 and held(pool) == 2
    with pytest.raises(MappingError):
        arena.free(b + chunk)  # not an allocation's address
    with pytest.raises(ValueError):
        arena.allocate(0)
    arena.free(b)
    arena.close()
    arena.free(b)  # after close: a no-op (torch may free late segments)


def test_random_allocations_keep_the_books(make_pool: Callable[[int], ChunkPool]) -> None:
    """Fresh random sequences of allocations and frees: the runs never overlap, the
    pool holds exactly the arena's chunks, and a refusal happens only without room."""
    pool = make_pool(24)
    chunk = pool.chunk_size
    arena = WorkspaceArena(pool, 32 * chunk)
    rng = random.Random()
    live: dict[int, int] = {}
    for _ in range(300):
        if live and rng.random() < 0.45:
            address = rng.choice(list(live))
            arena.free(address)
            del live[address]
        else:
            n = rng.randint(1, 6)
            try:
                address = arena.allocate(n * chunk - rng.randrange(chunk))
            except PoolExhaustedError:
                starts = sorted((a - arena.va) // chunk for a in live)
                edges = [0] + [e for s in starts for e in (s, s + live[arena.va + s * chunk])]
                gaps = [b - a for a, b in zip(edges[::2], [*edges[1::2], 32])]
                assert sum(live.values()) + n > 24 or max(gaps) < n  # truly no room
                continue
            live[address] = n
        spans = sorted((a - arena.va) // chunk for a in live)
        ends = [(s, s + live[arena.va + s * chunk]) for s in spans]
        assert all(e0 <= s1 for (_, e0), (s1, _) in itertools.pairwise(ends))
        assert held(pool) == arena.held_chunks == sum(live.values())
    arena.close()
    assert held(pool) == 0


# ----------------------------------------------------------------- torch on CUDA
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_torch_allocations_come_from_the_pool() -> None:
    from vtensor.memory import open_backend
    from vtensor.memory.torch_workspace import TorchWorkspace

    backend = open_backend("cuda")
    pool = ChunkPool(backend, 64 * backend.chunk_size)
    chunk = pool.chunk_size
    ws = TorchWorkspace(WorkspaceArena(pool, 64 * chunk), torch.device("cuda"))
    # Small integers: the product is exact in fp32 (and under TF32), whatever the kernel.
    w = torch.randint(-4, 5, (1024, 1024), device="cuda").float()
    x = torch.randint(-4, 5, (3000, 1024), device="cuda").float()
    with ws.use():
        y = x @ w  # 12 MB: a segment of the arena
        assert ws.arena.va <= y.data_ptr() < ws.arena.va + ws.arena.num_chunks * chunk
    assert torch.equal(y, (x.double() @ w.double()).float())
    assert pool.stats().in_use == ws.held_chunks > 0
    del y
    assert ws.release_cached() > 0 and ws.held_chunks == 0 == pool.stats().in_use
    with pytest.raises(torch.OutOfMemoryError), ws.use():
        torch.empty(65 * chunk, dtype=torch.uint8, device="cuda")  # beyond the pool
    assert ws.held_chunks == 0 and pool.stats().in_use == 0 and ws.errors == 0
    ws.close()
    pool.close()
    backend.close()
