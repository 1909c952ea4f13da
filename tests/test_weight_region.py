"""WeightRegion: bytes survive offload/restore at the same address; discard/restore maps
fresh chunks there; every chunk goes back to the driver while released; refused
transitions change nothing. On the host backend everywhere, and on CUDA with a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from vtensor.memory import PhysicalBackend, PinnedHostMemory, VTensorMemoryError
from vtensor.memory.host import HostBackend
from vtensor.memory.weight_region import RegionState, WeightRegion


def region_on(backend: PhysicalBackend, nbytes: int, keep: bool = True) -> WeightRegion:
    host = PinnedHostMemory(pin=backend.device.type == "cuda")
    return WeightRegion(backend, nbytes, host, keep_host_buffer=keep)


def resident(backend: PhysicalBackend) -> int | None:
    return backend.resident_bytes() if isinstance(backend, HostBackend) else None


@pytest.mark.parametrize("keep", [True, False])
def test_offload_restore_keeps_bytes_and_address(backend: PhysicalBackend, keep: bool) -> None:
    rng = random.Random()
    nbytes = rng.randint(1, 5) * backend.chunk_size - rng.randint(0, 999)
    region = region_on(backend, nbytes, keep)
    try:
        x = region.view(torch.float32, (nbytes // 4,), 0)
        x.copy_(torch.randn(nbytes // 4, device=backend.device))
        want, ptr = x.clone(), x.data_ptr()
        assert resident(backend) in (None, region.nbytes)
        region.offload()
        assert region.state is RegionState.OFFLOADED and region.stats().mapped_bytes == 0
        assert region.pool.stats().created == 0 and region.pool.stats().released > 0
        assert resident(backend) in (None, 0)  # the memfd's pages really went back
        assert region.stats().host_bytes == region.nbytes and not region.problems()
        with pytest.raises(VTensorMemoryError):
            region.offload()  # not resident: refused, nothing changes
        region.restore()
        assert region.state is RegionState.RESIDENT and not region.problems()
        assert x.data_ptr() == ptr and torch.equal(x, want)
        # the host buffer is kept for the next offload, or freed
        assert region.host.stats().live_bytes == (region.nbytes if keep else 0)
        assert region.stats().host_bytes == region.host.stats().live_bytes
        x.mul_(-1.0)
        region.offload()  # a second round trip: the kept buffer is reused, not pinned again
        region.restore()
        assert torch.equal(x, -want) and not region.problems()
        assert region.host.stats().allocated_bytes == region.nbytes * (1 if keep else 2)
        region.discard()
        assert region.stats().mapped_bytes == 0 and resident(backend) in (None, 0)
        region.restore()
        x.fill_(3.0)  # fresh chunks at the same address, writable again
        assert float(x.sum()) == 3.0 * x.numel() and not region.problems()
        with pytest.raises(VTensorMemoryError):
            region.restore()  # already resident
    finally:
        region.close()
        region.host.close()
    assert region.pool.closed and region.host.stats().live_bytes == 0


def test_close_while_offloaded_frees_everything(host_backend: PhysicalBackend) -> None:
    region = region_on(host_backend, 3 * host_backend.chunk_size)
    region.bytes().fill_(7)
    region.offload()
    region.close()
    assert region.pool.closed and region.host.stats().live_bytes == 0
    assert resident(host_backend) == 0


def test_random_transitions_keep_the_invariants(host_backend: PhysicalBackend) -> None:
    """Random sequences of offload / discard / restore / write, refused ones included:
    after each, the region's invariants hold, a resident region reads what was last
    written (or restored), and the memfd holds pages exactly while resident."""
    rng = random.Random()
    region = region_on(host_backend, rng.randint(1, 4) * host_backend.chunk_size)
    x = region.view(torch.int32, (region.nbytes // 4,), 0)
    want: torch.Tensor | None = torch.zeros_like(x)
    try:
        for _ in range(40):
            op = rng.choice(["offload", "discard", "restore", "write"])
            was = region.state
            if op == "write":
                if was is RegionState.RESIDENT:
                    want = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32)
                    x.copy_(want)
                continue
            legal = (was is RegionState.RESIDENT) == (op != "restore")
            if not legal:
                with pytest.raises(VTensorMemoryError):
                    getattr(region, op)()
                assert region.state is was
            else:
                getattr(region, op)()
                if op == "discard":
                    want = None  # the bytes are gone
                elif op == "restore" and want is None:
                    want = x.clone()  # fresh chunks: whatever they hold now
            assert not region.problems(), region.problems()
            if region.state is RegionState.RESIDENT:
                assert want is not None and torch.equal(x, want)
            else:
                assert resident(host_backend) == 0
    finally:
        region.close()
        region.host.close()
