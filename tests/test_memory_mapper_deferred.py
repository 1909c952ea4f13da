"""AsyncMapper's deferred ops: a ``DeferredOp`` that is not ready is parked, later
batches run before it, an exhausted pool waits for it, and close drains it."""

from __future__ import annotations

import random
import threading

from vtensor.memory import AsyncMapper, ChunkPool, DeferredOp, Map, VirtualTensor


class _GatedUnmap(DeferredOp):
    """Unmap ``[offset, offset + nbytes)`` once ``gate`` is set (a copy's event)."""

    def __init__(self, vt: VirtualTensor, offset: int, nbytes: int) -> None:
        self.vt, self.offset, self.nbytes = vt, offset, nbytes
        self.gate = threading.Event()
        self.applied_at: int | None = None  # the order in which ops were applied
        self.applied_while_closed = False

    def ready(self) -> bool:
        return self.gate.is_set()

    def wait_ready(self) -> None:
        assert self.gate.wait(5), "the gate never opened"

    def apply(self) -> int:
        self.applied_while_closed = not self.gate.is_set()
        self.wait_ready()
        return self.vt.unmap(self.offset, self.nbytes)


def _open_later(op: _GatedUnmap, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, op.gate.set)
    timer.start()
    return timer


def test_a_parked_op_does_not_hold_up_later_batches(pool: ChunkPool) -> None:
    cs, n = pool.chunk_size, random.randint(1, 4)
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 16 * cs) as vt:
        mapper.run([Map(vt, 0, n * cs)])
        unmap = _GatedUnmap(vt, 0, n * cs)
        parked = mapper.submit([unmap])
        later = mapper.submit([Map(vt, 8 * cs, cs)])
        later.wait(timeout=5)  # ran although the unmap before it is not ready
        assert not parked.done() and vt.mapped_chunks == n + 1
        unmap.gate.set()
        parked.wait(timeout=5)  # polled: it runs once ready
        assert vt.mapped_chunks == 1 and not unmap.applied_while_closed
        assert mapper.stats().pending == 0


def test_an_exhausted_pool_waits_for_the_parked_op(make_pool) -> None:  # type: ignore[no-untyped-def]
    size = random.randint(2, 6)
    pool: ChunkPool = make_pool(size)
    cs = pool.chunk_size
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 4 * size * cs) as vt:
        mapper.run([Map(vt, 0, size * cs)])  # the pool is full
        unmap = _GatedUnmap(vt, 0, size * cs)
        parked = mapper.submit([unmap])
        timer = _open_later(unmap, 0.05)
        # Needs the parked op's chunks: the mapper waits for it, then maps (no error).
        mapper.submit([Map(vt, 2 * size * cs, size * cs)]).wait(timeout=5)
        timer.join()
        assert parked.done() and vt.mapped_chunks == size
        assert not unmap.applied_while_closed


def test_a_ready_deferred_op_runs_in_order(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with AsyncMapper(pool.backend) as mapper, VirtualTensor(pool, 8 * cs) as vt:
        mapper.run([Map(vt, 0, cs)])
        unmap = _GatedUnmap(vt, 0, cs)
        unmap.gate.set()
        first = mapper.submit([unmap])
        mapper.run([Map(vt, 0, cs)])  # the same range: only valid after the unmap
        assert first.done() and vt.mapped_chunks == 1


def test_close_and_wait_parked_drain_parked_ops(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 8 * cs) as vt:
        mapper = AsyncMapper(pool.backend)
        mapper.run([Map(vt, 0, 2 * cs)])
        ops = [_GatedUnmap(vt, 0, cs), _GatedUnmap(vt, cs, cs)]
        tickets = [mapper.submit([op]) for op in ops]
        mapper.run([])  # both are parked by now (the worker got past them)
        timer = _open_later(ops[0], 0.05)
        ops[1].gate.set()
        mapper.wait_parked()
        timer.join()
        assert all(t.done() for t in tickets) and vt.mapped_chunks == 0
        again = _GatedUnmap(vt, 0, cs)
        mapper.run([Map(vt, 0, cs)])
        parked = mapper.submit([again])
        timer = _open_later(again, 0.05)
        mapper.close()  # finishes the parked op before it returns
        timer.join()
        assert parked.done() and vt.mapped_chunks == 0
