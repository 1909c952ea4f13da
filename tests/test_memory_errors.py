"""Every error path raises a typed error and leaves the state as it was."""

from __future__ import annotations

import pytest
import torch

from vtensor.memory import (
    ChunkPool,
    ClosedError,
    NoCudaDriverError,
    NotMappedError,
    OutOfRangeError,
    OverlapError,
    PoolExhaustedError,
    VirtualTensor,
    open_backend,
)


def _snapshot(pool: ChunkPool, vt: VirtualTensor) -> tuple[object, ...]:
    s = pool.stats()
    table = tuple(c.cid if c else None for c in vt._table)
    return (s, table, vt.mapped_chunks)


def test_pool_exhausted_carries_bytes_and_changes_nothing(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(4)
    cs = pool.chunk_size
    with VirtualTensor(pool, 16 * cs) as vt:
        vt.map(0, 3 * cs)
        before = _snapshot(pool, vt)
        with pytest.raises(PoolExhaustedError) as err:
            vt.map(4 * cs, 2 * cs)
        assert err.value.requested_bytes == 2 * cs
        assert err.value.available_bytes == cs
        assert "requested" in str(err.value)
        with pytest.raises(PoolExhaustedError):
            vt.ensure_mapped(0, 10 * cs)
        assert _snapshot(pool, vt) == before
        vt.map(4 * cs, cs)  # what is left is still usable


def test_out_of_range_and_misaligned(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 4 * cs) as vt:
        vt.map(0, cs)
        before = _snapshot(pool, vt)
        for offset, nbytes in [(4 * cs, cs), (3 * cs, 2 * cs), (-cs, cs), (cs // 2, cs), (0, 0)]:
            with pytest.raises(OutOfRangeError):
                vt.map(offset, nbytes)
        with pytest.raises(OutOfRangeError):
            vt.view(torch.float32, (cs + 1,), offset=3 * cs)
        with pytest.raises(OutOfRangeError):
            vt.view(torch.float32, (4,), offset=2)  # not a multiple of the itemsize
        assert _snapshot(pool, vt) == before


def test_overlap_is_refused(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 8 * cs) as vt, VirtualTensor(pool, 8 * cs) as other:
        vt.map(2 * cs, 2 * cs)
        other.map(0, cs)
        before = _snapshot(pool, vt)
        with pytest.raises(OverlapError):
            vt.map(0, 3 * cs)
        with pytest.raises(OverlapError):
            vt.map_chunks(3 * cs, other.chunks(0, cs))
        assert _snapshot(pool, vt) == before
        assert pool.refcount(other.chunks(0, cs)[0]) == 1


def test_unmap_of_unmapped_range(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 8 * cs) as vt:
        vt.map(0, 2 * cs)
        before = _snapshot(pool, vt)
        with pytest.raises(NotMappedError):
            vt.unmap(cs, 2 * cs)  # half mapped: nothing may be unmapped
        with pytest.raises(NotMappedError):
            vt.chunks(0, 3 * cs)
        assert _snapshot(pool, vt) == before


def test_double_close_and_use_after_close(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    vt = VirtualTensor(pool, 2 * cs)
    vt.map(0, cs)
    vt.close()
    with pytest.raises(ClosedError):
        vt.close()
    with pytest.raises(ClosedError):
        vt.map(0, cs)
    with pytest.raises(ClosedError):
        vt.view(torch.uint8, (1,))


def test_pool_refuses_bad_references(pool: ChunkPool) -> None:
    (chunk,) = pool.acquire(1)
    pool.release([chunk])
    with pytest.raises(Exception, match="not held"):
        pool.release([chunk])
    with pytest.raises(Exception, match="not in use"):
        pool.retain([chunk])
    assert pool.stats().free == 1


def test_no_cuda_driver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine without libcuda, whatever this machine has."""
    from cuda.bindings import driver

    class DynamicLibNotFoundError(RuntimeError):
        pass

    def no_lib(flags: int) -> None:
        raise DynamicLibNotFoundError('"cuda" is an NVIDIA driver library')

    monkeypatch.setattr(driver, "cuInit", no_lib)
    with pytest.raises(NoCudaDriverError, match="no CUDA driver found; use the host backend"):
        open_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_backend_without_gpu() -> None:
    with pytest.raises(NoCudaDriverError, match="use the host backend"):
        open_backend("cuda")


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown memory backend"):
        open_backend("tpu")
