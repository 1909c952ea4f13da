"""Host buffers for offloaded weights: exact sizes, zero-filled, accounted, and pinned
(page-locked, so copies from them are asynchronous) where a GPU is."""

from __future__ import annotations

import pytest
import torch

from vtensor.memory import ClosedError, PinnedHostMemory, VTensorMemoryError


def test_buffers_are_exact_zeroed_writable_and_accounted() -> None:
    mem = PinnedHostMemory(pin=False)
    a, b = mem.alloc(10_000), mem.alloc(3)
    assert a.tensor.numel() == 10_000 and b.tensor.numel() == 3
    assert not a.tensor.any() and a.tensor.dtype == torch.uint8
    a.tensor.copy_(torch.randint(0, 256, (10_000,), dtype=torch.uint8))
    s = mem.stats()
    assert (s.live_buffers, s.live_bytes, s.allocated_bytes) == (2, 10_003, 10_003)
    assert s.freed_bytes == 0
    assert s.balanced and not s.pinned
    mem.free(a)
    s = mem.stats()
    assert (s.live_buffers, s.live_bytes, s.freed_bytes) == (1, 3, 10_000) and s.balanced
    with pytest.raises(VTensorMemoryError, match="not live"):
        mem.free(a)
    mem.close()
    s = mem.stats()
    assert s.live_bytes == 0 and s.freed_bytes == s.allocated_bytes and mem.closed
    mem.close()  # idempotent
    with pytest.raises(ClosedError):
        mem.alloc(1)


def test_bad_sizes_are_refused() -> None:
    mem = PinnedHostMemory(pin=False)
    with pytest.raises(ValueError, match="positive"):
        mem.alloc(0)
    assert mem.stats().live_buffers == 0
    mem.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinning_needs_a_gpu() -> None:
    with pytest.raises(VTensorMemoryError, match="needs a CUDA device"):
        PinnedHostMemory(pin=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_buffers_are_page_locked_and_copy_asynchronously() -> None:
    mem = PinnedHostMemory(pin=True)
    n = 64 << 20
    buf = mem.alloc(n)
    assert buf.tensor.is_pinned()
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    buf.tensor.copy_(src)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the copy queues behind ~25 ms of spinning
        dst.copy_(buf.tensor, non_blocking=True)
    assert not side.query()  # the host did not wait for the copy: it is asynchronous
    side.synchronize()
    assert torch.equal(dst.cpu(), src)
    mem.free(buf)
    assert mem.stats().live_bytes == 0
    mem.close()
