"""Shared fixtures: backends (host everywhere, CUDA where a GPU is) and balanced pools.

The ``pool`` and ``make_pool`` fixtures enforce the project-wide invariant:
after every test, each pool's accounting balances (created == free + in use)
and no chunk is left in use or referenced — no leaked chunks, no mappings left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vtensor.memory import ChunkPool, NoCudaDriverError, PhysicalBackend, open_backend

MiB = 1 << 20


def _open(name: str) -> PhysicalBackend:
    try:
        return open_backend(name)
    except NoCudaDriverError as exc:
        pytest.skip(f"CUDA backend unavailable on this machine: {exc}")


@pytest.fixture(params=["host", "cuda"])
def backend(request: pytest.FixtureRequest) -> Iterator[PhysicalBackend]:
    b = _open(request.param)
    yield b
    b.close()


@pytest.fixture
def host_backend() -> Iterator[PhysicalBackend]:
    b = open_backend("host")
    yield b
    b.close()


def assert_pool_clean(pool: ChunkPool) -> None:
    s = pool.stats()
    assert s.balanced, f"pool accounting does not balance: {s}"
    assert s.in_use == 0 and s.references == 0, f"chunks leaked: {s}"


@pytest.fixture
def make_pool(backend: PhysicalBackend) -> Iterator[Callable[[int], ChunkPool]]:
    """Factory of pools on ``backend``; each is checked for leaks at teardown."""
    pools: list[ChunkPool] = []

    def make(capacity_chunks: int = 64) -> ChunkPool:
        p = ChunkPool(backend, capacity_chunks * backend.chunk_size)
        pools.append(p)
        return p

    yield make
    for p in pools:
        assert_pool_clean(p)
        p.close()


@pytest.fixture
def pool(make_pool: Callable[[int], ChunkPool]) -> ChunkPool:
    return make_pool(64)
