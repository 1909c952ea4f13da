"""CUDA-only behaviour: mapping does not wait for kernels in flight."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from vtensor.memory import (
    AsyncMapper,
    ChunkPool,
    EnsureMapped,
    NoCudaDriverError,
    PhysicalBackend,
    Unmap,
    VirtualTensor,
    open_backend,
)

from .conftest import assert_pool_clean


@pytest.fixture
def cuda_pool() -> Iterator[ChunkPool]:
    try:
        backend: PhysicalBackend = open_backend("cuda")
    except NoCudaDriverError as exc:
        pytest.skip(f"needs a CUDA GPU: {exc}")
    pool = ChunkPool(backend, 512 * backend.chunk_size)
    yield pool
    assert_pool_clean(pool)
    pool.close()
    backend.close()


def _busy_gpu(seconds_hint: int = 40) -> tuple[torch.Tensor, torch.cuda.Event]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = a
    for _ in range(seconds_hint):
        out = (out @ a) * (1.0 / 128)
    done = torch.cuda.Event()
    done.record()
    return out, done


def test_map_and_unmap_while_kernels_run(cuda_pool: ChunkPool) -> None:
    cs = cuda_pool.chunk_size
    with AsyncMapper(cuda_pool.backend) as mapper, VirtualTensor(cuda_pool, 256 * cs) as vt:
        mapper.run([EnsureMapped(vt, 128 * cs, 64 * cs)])  # something to unmap later
        torch.cuda.synchronize()
        out, done = _busy_gpu()
        t0 = time.perf_counter()
        mapper.run([EnsureMapped(vt, 0, 64 * cs), Unmap(vt, 128 * cs, 64 * cs)])
        map_s = time.perf_counter() - t0
        still_running = not done.query()
        x = vt.view(torch.float32, (64 * cs // 4,))
        data = torch.randn_like(x)
        x.copy_(data)  # queued behind the matmuls, on the new mapping
        torch.cuda.synchronize()
        assert still_running, f"mapping 128 chunks ({map_s * 1e3:.1f} ms) outlasted the kernels"
        assert torch.equal(x, data)
        assert torch.isfinite(out.float()).all()


def test_views_work_in_torch_kernels(cuda_pool: ChunkPool) -> None:
    cs = cuda_pool.chunk_size
    with VirtualTensor(cuda_pool, 64 * cs) as vt:
        vt.map(0, 16 * cs)
        n = 16 * cs // 2
        side = int(n**0.5) // 8 * 8
        m = vt.view(torch.bfloat16, (side, side))
        ref = torch.randn(side, side, device="cuda", dtype=torch.bfloat16)
        m.copy_(ref)
        got = m @ m
        want = ref @ ref
        assert torch.equal(got, want)
        assert m.data_ptr() == vt.va
