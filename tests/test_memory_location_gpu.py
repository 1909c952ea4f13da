"""Host-located CUDA chunks mapped into a device virtual range (heterogeneous mapping), on
the GPU: the driver reports them host-located and device-accessible at the addresses we
mapped, torch kernels read and write them, and the decode kernel over a KV arena whose
coldest chunks are host-located matches the fp32 reference of the same K/V.

Skipped with a reason on machines without a GPU, or whose driver cannot create
host-located chunks (the reason is the driver's own answer); run on the H100.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from vtensor.kernels.decode import decode_attention
from vtensor.kernels.reference import decode_ref
from vtensor.kvcache import KVLayout
from vtensor.memory import (
    ChunkPool,
    HostLocationUnsupportedError,
    NoCudaDriverError,
    VirtualTensor,
    open_backend,
)
from vtensor.memory.cuda import CudaBackend

from .conftest import assert_pool_clean
from .kernel_cases import TOLERANCE, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def pools() -> Iterator[tuple[ChunkPool, ChunkPool]]:
    """(device pool, host-located pool) on device 0."""
    try:
        dev_b = open_backend("cuda")
    except NoCudaDriverError as exc:
        pytest.skip(f"needs a CUDA GPU: {exc}")
    try:
        host_b = open_backend("cuda", location="host")
    except HostLocationUnsupportedError as exc:
        dev_b.close()
        pytest.skip(str(exc))
    assert host_b.chunk_size == dev_b.chunk_size, "locations with different chunk sizes"
    dev = ChunkPool(dev_b, 64 * dev_b.chunk_size)
    host = ChunkPool(host_b, 64 * host_b.chunk_size)
    yield dev, host
    for pool in (dev, host):
        assert_pool_clean(pool)
        pool.close()
    host_b.close()
    dev_b.close()


def _cuda(pool: ChunkPool) -> CudaBackend:
    assert isinstance(pool.backend, CudaBackend)
    return pool.backend


def test_host_chunks_are_host_located_device_accessible_and_torch_reads_writes_them(
    pools: tuple[ChunkPool, ChunkPool],
) -> None:
    dev, host = pools
    cs = dev.chunk_size
    assert _cuda(host).location == "host" and _cuda(host).chunk_location.kind == "host"
    with VirtualTensor(dev, 8 * cs) as vt:
        vt.map(0, 3 * cs, pool=host)
        vt.map(3 * cs, 2 * cs)
        for i in range(5):  # the driver, asked by address, agrees with where we mapped what
            where = _cuda(dev).location_at(vt.va + i * cs + 4096).kind
            assert where == ("host" if i < 3 else "device"), (i, where)
            assert _cuda(dev).device_can_access(vt.va + i * cs)
        for i, chunk in vt.mapped_table():
            assert _cuda(vt.owner(i)).location_of(chunk).kind == ("host" if i < 3 else "device")
        x = vt.view(torch.float32, (5 * cs // 4,))
        data = torch.randn(x.shape, device="cuda")
        x.copy_(data)  # a copy engine writes across host and device chunks
        x.mul_(3.0)  # an SM kernel reads and writes them
        torch.cuda.synchronize()
        want = data * 3.0
        assert torch.equal(x, want)
        assert torch.equal(x[: 3 * cs // 4].cpu(), want[: 3 * cs // 4].cpu())


def test_decode_over_host_located_cold_chunks_matches_the_fp32_reference(
    pools: tuple[ChunkPool, ChunkPool],
) -> None:
    """Llama-3-8B's head geometry (32 query / 8 KV heads, d=128, bf16) in the real token-major
    layout: each slot's first chunks host-located (one slot entirely), the rest on the
    device; decode reads across the boundary inside a request."""
    dev, host = pools
    cs = dev.chunk_size
    layout = KVLayout(num_slots=3, max_tokens=1024, num_layers=2, num_kv_heads=8, head_dim=128)
    per_slot = layout.max_tokens * layout.bytes_per_token // cs  # 4 chunks of 256 tokens
    host_chunks = [2, 1, per_slot]
    dense = torch.randn(layout.shape, device="cuda").to(layout.dtype)
    with VirtualTensor(dev, layout.total_bytes) as vt:
        for slot, n_host in enumerate(host_chunks):
            base = slot * per_slot * cs
            vt.map(base, n_host * cs, pool=host)
            if n_host < per_slot:
                vt.map(base + n_host * cs, (per_slot - n_host) * cs)
        assert [vt.owner(i) is host for i in range(3 * per_slot)] == [
            i % per_slot < host_chunks[i // per_slot] for i in range(3 * per_slot)
        ]
        arena = vt.view(layout.dtype, layout.shape, layout.strides)
        arena.copy_(dense)
        lens = [random.randint(600, 1024), random.randint(300, 1024), random.randint(1, 1024)]
        rows = torch.tensor([layout.row_start(s) for s in range(3)], dtype=torch.int32).cuda()
        lengths = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(3, 32, 128, device="cuda").to(layout.dtype)
        for layer in range(layout.num_layers):
            k, v = layout.k_view(arena, layer), layout.v_view(arena, layer)
            out = decode_attention(q, k, v, rows, lengths, layout.max_tokens)
            ref = decode_ref(
                q.float(),
                layout.k_view(dense, layer).float(),
                layout.v_view(dense, layer).float(),
                rows,
                lengths,
                128**-0.5,
            )
            assert rel_err(out, ref) < TOLERANCE[torch.bfloat16], (layer, lens)
        torch.cuda.synchronize()
