"""AsyncMapper: background mapping, tickets, errors, concurrency, shutdown."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import pytest
import torch

from vtensor.memory import (
    AsyncMapper,
    ChunkPool,
    EnsureMapped,
    Map,
    MapperError,
    MapShared,
    NotMappedError,
    PoolExhaustedError,
    Trim,
    Unmap,
    VirtualTensor,
    Warm,
)


@dataclass(frozen=True)
class _Gated(EnsureMapped):
    """An op that holds the worker until ``gate`` opens (at most 5 s)."""

    gate: threading.Event = field(default_factory=threading.Event)

    def apply(self) -> int:
        self.gate.wait(5)
        return super().apply()


def _mapper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vtensor-mapper")]


def test_map_in_background_then_use(pool: ChunkPool) -> None:
    cs, dev = pool.chunk_size, pool.backend.device
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 16 * cs) as vt:
        ticket = mapper.submit([Warm(pool, 4), EnsureMapped(vt, 0, 4 * cs)])
        ticket.wait()
        assert ticket.done() and ticket.chunks == 8  # 4 warmed + 4 mapped
        x = vt.view(torch.float32, (cs,))  # 4 chunks of float32
        data = torch.randn(cs, device=dev)
        x.copy_(data)  # used from the main thread: same context on CUDA
        assert torch.equal(vt.view(torch.float32, (cs,)), data)
        mapper.run([Unmap(vt, 0, 2 * cs), Trim(pool, keep_free=0)])
        assert pool.stats().created == 2
        st = mapper.stats()
        assert st.batches == 2 and st.ops == 4 and st.pending == 0


def test_error_reraises_in_waiter_and_stops_batch(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(4)
    cs = pool.chunk_size
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 8 * cs) as vt:
        ticket = mapper.submit([Map(vt, 0, cs), Unmap(vt, 4 * cs, cs), Map(vt, cs, cs)])
        with pytest.raises(NotMappedError) as err:
            ticket.wait()
        assert any("mapper op 1 of 3" in n for n in err.value.__notes__)
        assert vt.mapped_chunks == 1  # op 0 applied, op 2 skipped
        with pytest.raises(PoolExhaustedError):
            mapper.run([Map(vt, 2 * cs, 5 * cs)])
        mapper.run([Map(vt, cs, cs)])  # the mapper survives its errors
        assert vt.mapped_chunks == 2


def test_concurrent_submitters(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool: ChunkPool = make_pool(256)
    cs, dev = pool.chunk_size, pool.backend.device
    n_threads, per_thread = 4, 12
    errors: list[BaseException] = []
    with AsyncMapper(pool.backend) as mapper:
        source = VirtualTensor(pool, 4 * cs)
        mapper.run([Map(source, 0, 2 * cs)])
        shared = tuple(source.chunks(0, 2 * cs))

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                with VirtualTensor(pool, 64 * cs) as vt:
                    tickets = []
                    for step in range(per_thread):
                        end = (step + 1) * 2 * cs
                        tickets.append(mapper.submit([EnsureMapped(vt, 0, end)]))
                        if rng.random() < 0.3:
                            tickets[-1].wait()
                    tickets.append(mapper.submit([MapShared(vt, 60 * cs, shared)]))
                    for t in tickets:
                        t.wait()
                    assert vt.mapped_chunks == 2 * per_thread + 2
                    mapper.run([Unmap(vt, 60 * cs, 2 * cs)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [pool.refcount(c) for c in shared] == [1, 1]
        probe = source.view(torch.float32, (8,))
        probe.copy_(torch.randn(8, device=dev))
        assert torch.isfinite(probe).all()
        source.close()
    s = mapper.stats()
    assert s.pending == 0 and s.batches >= n_threads * (per_thread + 2)


def test_close_finishes_and_joins(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    vt = VirtualTensor(pool, 32 * cs)
    mapper = AsyncMapper(pool.backend)
    tickets = [mapper.submit([EnsureMapped(vt, 0, (i + 1) * cs)]) for i in range(16)]
    mapper.close()
    assert all(t.done() for t in tickets)  # nothing submitted is dropped
    assert vt.mapped_chunks == 16
    assert not _mapper_threads()
    with pytest.raises(MapperError):
        mapper.submit([Unmap(vt, 0, cs)])
    vt.close()


def test_wait_time_is_accounted(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 32 * cs) as vt:
        gate = threading.Event()
        ticket = mapper.submit([_Gated(vt, 0, cs, gate)])
        threading.Timer(0.05, gate.set).start()
        ticket.wait(timeout=5)
        assert mapper.stats().wait_s >= 0.03


def test_wait_timeout(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 4 * cs) as vt:
        gate = threading.Event()
        ticket = mapper.submit([_Gated(vt, 0, cs, gate)])
        with pytest.raises(TimeoutError):
            ticket.wait(timeout=0.01)
        gate.set()
        ticket.wait()
