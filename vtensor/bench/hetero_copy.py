"""Copy bandwidth between the device and the two ways to hold host KV (issue 14):

* **pinned**: a ``PinnedHostMemory`` buffer (an ``mmap`` registered with
  ``cudaHostRegister``: what the host KV tier holds today), copied with
  ``Tensor.copy_(non_blocking=True)``, i.e. ``cudaMemcpyAsync`` host <-> device;
* **vmm_host**: ``cuMemCreate`` chunks with a host location, mapped into a virtual
  range that the device may access: a *device* tensor whose bytes are in host memory,
  copied with ``copy_`` (``cudaMemcpyAsync`` device <-> device: the copy engine reads
  or writes host memory through the mapping);
* **vmm_host_sm**: the same range read and written by an SM kernel (``torch.mul`` over
  fp32 views) instead of a copy engine: how a kernel such as decode attention reads
  host-located KV, with no copy.

Each is timed with CUDA events around ``reps`` back-to-back copies after warm-up, in
both directions, at each size; GB/s are 1e9 bytes per second of one direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vtensor.memory import ChunkPool, PinnedHostMemory, VirtualTensor

MiB = 1 << 20
SIZES = (2 * MiB, 64 * MiB)
Call = Callable[[], object]


@dataclass(frozen=True)
class CopyRate:
    method: str  # pinned | vmm_host | vmm_host_sm
    direction: str  # h2d | d2h
    nbytes: int
    reps: int
    ms_per_copy: float
    gbs: float


def time_copies(fn: Call, nbytes: int, reps: int) -> tuple[float, float]:
    """(ms per call, GB/s) of ``reps`` calls of ``fn`` back to back, after 3 warm-ups."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / reps
    return ms, nbytes / (ms * 1e6)


def _reps(nbytes: int) -> int:
    return max(10, min(100, (512 * MiB) // nbytes))  # ~0.5 GB per measurement, 10-100 copies


def copy_rates(host_pool: ChunkPool, device: torch.device) -> tuple[list[CopyRate], list[str]]:
    """Every method, direction and size of :data:`SIZES` (see the module doc), and the
    errors of those that failed (each is tried on its own; a failure that leaves the
    device unusable propagates from the synchronize after it).
    ``host_pool``: a pool of host-located CUDA chunks on ``device``."""
    top = max(SIZES)
    dev = torch.empty(top, dtype=torch.uint8, device=device)
    dev.random_(0, 256)
    pinned_mem = PinnedHostMemory(pin=True)
    out: list[CopyRate] = []
    errors: list[str] = []
    with VirtualTensor(host_pool, top) as vt:
        vt.map(0, top)
        vmm = vt.view(torch.uint8, (top,))
        if vmm.device != dev.device:
            raise RuntimeError(f"host-located range viewed on {vmm.device}, not {dev.device}")
        try:
            pinned = pinned_mem.alloc(top).tensor
            for n in SIZES:
                reps = _reps(n)
                calls = _calls(dev[:n], pinned[:n], vmm[:n])
                for (method, direction), fn in calls.items():
                    try:
                        ms, gbs = time_copies(fn, n, reps)
                    except Exception as exc:
                        errors.append(f"{method} {direction} {n} B: {type(exc).__name__}: {exc}")
                        torch.cuda.synchronize()
                        continue
                    out.append(CopyRate(method, direction, n, reps, ms, gbs))
            try:
                _check_round_trip(dev, vmm, pinned)
            except Exception as exc:
                errors.append(f"round trip: {type(exc).__name__}: {exc}")
        finally:
            torch.cuda.synchronize()
            pinned_mem.close()
    return out, errors


def _calls(d: torch.Tensor, p: torch.Tensor, h: torch.Tensor) -> dict[tuple[str, str], Call]:
    """Each (method, direction)'s copy of one size: ``d`` device, ``p`` pinned, ``h``
    host-located (a device tensor over host memory)."""
    df, hf = d.view(torch.float32), h.view(torch.float32)
    return {
        ("pinned", "h2d"): lambda: d.copy_(p, non_blocking=True),
        ("pinned", "d2h"): lambda: p.copy_(d, non_blocking=True),
        ("vmm_host", "h2d"): lambda: d.copy_(h),
        ("vmm_host", "d2h"): lambda: h.copy_(d),
        ("vmm_host_sm", "h2d"): lambda: torch.mul(hf, 1.0, out=df),
        ("vmm_host_sm", "d2h"): lambda: torch.mul(df, 1.0, out=hf),
    }


def _check_round_trip(dev: torch.Tensor, vmm: torch.Tensor, pinned: torch.Tensor) -> None:
    """The bytes really went through: device -> host-located -> pinned equals the source."""
    src = torch.randint(0, 256, dev.shape, dtype=torch.uint8, device=dev.device)
    dev.copy_(src)
    vmm.copy_(dev)
    pinned.copy_(vmm, non_blocking=True)
    torch.cuda.synchronize()
    if not torch.equal(pinned, src.cpu()):
        raise RuntimeError("a round trip through host-located chunks changed the bytes")


def rates_table(rates: list[CopyRate]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rates]


def best_rate(rates: list[CopyRate], method: str, direction: str) -> float:
    """The highest GB/s of a method and direction over the sizes (the large copy, usually)."""
    found = [r.gbs for r in rates if r.method == method and r.direction == direction]
    return max(found) if found else float("nan")
