"""Shared fixtures: backends (host everywhere, CUDA where a GPU is) and balanced pools.

The ``pool`` and ``make_pool`` fixtures enforce the project-wide invariant:
after every test, each pool's accounting balances (created == free + in use)
and no chunk is left in use or referenced — no leaked chunks, no mappings left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

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


def assert_engine_balanced(engine: Any) -> None:
    """The engine's invariants hold (``check_integrity``), and with nothing left to apply
    the books match the pool: every chunk in use is a slot's, the prefix cache's (or
    the scratch one). Then the leak check: resetting the prefix cache (which also
    unmaps idle slots) gives every chunk but the scratch slot's back to the pool."""
    engine.check_integrity()
    assert not engine.kv.pending_commands(), "KV commands left unapplied"
    s = engine.pool.stats()
    usage = engine.kv.usage()
    assert s.balanced, f"pool accounting does not balance: {s}"
    scratch = engine.kv.geometry.chunks_for(1)
    workspace = engine.runner.workspace  # the unified pool's on CUDA: in the same pool
    ws = 0 if workspace is None else workspace.held_chunks
    assert s.in_use == usage.committed_chunks + scratch + ws, f"pool {s} vs manager {usage}"
    assert s.references == engine.arena.vt.mapped_chunks + len(engine.arena.held) + ws
    if not engine.has_unfinished():
        if workspace is not None:
            workspace.release_cached()
        assert engine.reset_prefix_cache(), "the prefix cache refused a reset while idle"
        engine.arena.wait_all()
        s = engine.pool.stats()
        assert s.in_use == scratch and s.references == scratch, f"chunks leaked: {s}"
        assert not engine.arena.held and engine.kv.usage().committed_chunks == 0
        engine.check_integrity()


def assert_offload_released(engine: Any) -> None:
    """A closed engine with weight offload gave back its ring and every host byte."""
    off = engine.offload
    if off is not None:
        assert off.closed and off.ring.closed, "the offload ring outlived its engine"
        assert not off.problems(), off.problems()
        assert off.host.stats().live_bytes == 0 and off.host.closed


@pytest.fixture
def make_llm() -> Iterator[Callable[..., Any]]:
    """Factory of ``LLM`` objects; at teardown each must pass ``check_integrity`` and
    balance, then close with no leak (KV pool, and weight offload's ring and host memory)."""
    from vtensor import LLM

    made: list[Any] = []

    def make(model: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("device", "cpu")  # CPU tests stay on the CPU on a GPU machine too
        llm = LLM(model, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        if llm.engine.closed:  # the test closed it (and checked it first)
            assert_offload_released(llm.engine)
            continue
        assert_engine_balanced(llm.engine)
        pool = llm.engine.pool
        llm.close()  # unmaps everything; ChunkPool.close raises if a chunk is still held
        assert pool.closed
        assert_offload_released(llm.engine)
