"""VirtualTensor on every backend: map, view, alias, grow, unmap, close."""

from __future__ import annotations

import torch

from vtensor.memory import ChunkPool, VirtualTensor


def _rand(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device)


def test_map_view_write_read(pool: ChunkPool) -> None:
    cs, dev = pool.chunk_size, pool.backend.device
    with VirtualTensor(pool, 16 * cs) as vt:
        vt.map(0, 3 * cs)
        n = 3 * cs // 4
        x = vt.view(torch.float32, (n,))
        data = _rand((n,), dev)
        x.copy_(data)
        assert torch.equal(vt.view(torch.float32, (n,)), data)
        # A strided, offset view of other dtype reads the same bytes.
        half = vt.view(torch.float32, (n // 2,), strides=(2,), offset=4)
        assert torch.equal(half, data[1::2])
        assert vt.mapped_bytes == 3 * cs
        assert pool.stats().in_use == 3


def test_alias_across_tensors_and_offsets(pool: ChunkPool) -> None:
    cs, dev = pool.chunk_size, pool.backend.device
    n = cs // 2  # fp16 elements per chunk
    with VirtualTensor(pool, 8 * cs) as a, VirtualTensor(pool, 8 * cs) as b:
        a.map(0, 2 * cs)
        shared = a.chunks(0, 2 * cs)
        b.map_chunks(4 * cs, shared)
        b.map_chunks(0, shared[:1])  # the same chunk at a second offset
        assert [pool.refcount(c) for c in shared] == [3, 2]
        assert pool.stats().shared == 2
        va = a.view(torch.float16, (2 * n,))
        vb = b.view(torch.float16, (2 * n,), offset=4 * cs)
        va.copy_(_rand((2 * n,), dev).half())
        assert torch.equal(vb, va)  # write through a, read through b
        vb[:n].copy_(_rand((n,), dev).half())
        assert torch.equal(va[:n], vb[:n])  # and the other way round
        assert torch.equal(b.view(torch.float16, (n,)), va[:n])  # second offset too
        a.close()
        # a's mappings are gone but b still holds the chunks, with their data.
        assert [pool.refcount(c) for c in shared] == [2, 1]
        assert torch.equal(b.view(torch.float16, (n,)), vb[:n])
        assert pool.stats().in_use == 2
    assert pool.stats().free == 2


def test_growth_keeps_address_stable(pool: ChunkPool) -> None:
    cs, dev = pool.chunk_size, pool.backend.device
    with VirtualTensor(pool, 32 * cs) as vt:
        n = 4 * cs // 4
        full = vt.view(torch.float32, (n,))  # taken before anything is mapped
        ptr = full.data_ptr()
        assert ptr == vt.va
        first = _rand((cs // 4,), dev)
        assert vt.ensure_mapped(0, cs) == 1
        full[: cs // 4].copy_(first)
        assert vt.ensure_mapped(0, 4 * cs) == 3  # grows in place: only the holes
        assert vt.ensure_mapped(0, 4 * cs) == 0
        full[cs // 4 :].fill_(7.0)
        assert vt.view(torch.float32, (n,)).data_ptr() == ptr
        assert torch.equal(full[: cs // 4], first)  # old data untouched by growth
        assert bool((full[cs // 4 :] == 7.0).all())


def test_ensure_mapped_fills_holes_around_existing(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 8 * cs) as vt:
        vt.map(2 * cs, cs)
        vt.map(5 * cs, cs)
        before = vt.chunks(2 * cs, cs) + vt.chunks(5 * cs, cs)
        assert vt.ensure_mapped(cs // 2, 7 * cs) == 6  # byte range, unaligned start
        assert vt.chunks(2 * cs, cs) + vt.chunks(5 * cs, cs) == before
        assert vt.mapped_chunks == 8


def test_unmap_returns_chunks_and_allows_remap(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    with VirtualTensor(pool, 8 * cs) as vt:
        vt.map(0, 4 * cs)
        s = pool.stats()
        assert (s.created, s.in_use, s.free) == (4, 4, 0)
        vt.unmap(cs, 2 * cs)
        s = pool.stats()
        assert (s.created, s.in_use, s.free, vt.mapped_chunks) == (4, 2, 2, 2)
        assert not vt.is_mapped(cs, 1) and vt.is_mapped(0, cs)
        vt.map(cs, 2 * cs)  # recycled: nothing new created
        s = pool.stats()
        assert (s.created, s.in_use, s.free) == (4, 4, 0)


def test_accounting_after_every_operation(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    vts = [VirtualTensor(pool, 8 * cs) for _ in range(3)]
    steps = [
        lambda: vts[0].map(0, 4 * cs),
        lambda: vts[1].map_chunks(0, vts[0].chunks(0, 2 * cs)),
        lambda: vts[2].ensure_mapped(0, 3 * cs),
        lambda: vts[0].unmap(0, cs),
        lambda: vts[1].close(),
        lambda: vts[2].unmap(cs, cs),
        lambda: vts[0].close(),
        lambda: vts[2].close(),
    ]
    for step in steps:
        step()
        s = pool.stats()
        assert s.balanced, s
        live = sum(vt.mapped_chunks for vt in vts if not vt.closed)
        assert s.references == live, (s, live)


def test_close_releases_everything(pool: ChunkPool) -> None:
    cs = pool.chunk_size
    vt = VirtualTensor(pool, 64 * cs)
    vt.map(0, 2 * cs)
    vt.map(10 * cs, 5 * cs)
    vt.close()
    s = pool.stats()
    assert (s.in_use, s.free, s.created) == (0, 7, 7)
    assert vt.closed


def test_views_of_many_dtypes_and_shapes(pool: ChunkPool) -> None:
    cs, dev = pool.chunk_size, pool.backend.device
    with VirtualTensor(pool, 4 * cs) as vt:
        vt.map(0, 4 * cs)
        raw = vt.view(torch.uint8, (4 * cs,))
        raw.copy_(torch.randint(0, 256, (4 * cs,), dtype=torch.uint8, device=dev))
        for dtype in (torch.bfloat16, torch.float16, torch.int32, torch.float64):
            item = torch.empty(0, dtype=dtype).element_size()
            t = vt.view(dtype, (16, 8, 4), offset=cs)
            expect = raw[cs : cs + 16 * 8 * 4 * item].view(dtype).view(16, 8, 4)
            assert torch.equal(t.view(torch.uint8), expect.view(torch.uint8))
