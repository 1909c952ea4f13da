"""Host memory for weights the GPU reads over the bus: page-locked where a GPU is.

A buffer is an anonymous ``mmap`` of its exact size (no rounding: torch's
pinned caching allocator rounds every request up to a power of two, which
would turn 70 GB of offloaded weights into 128), registered with the CUDA
driver (``cudaHostRegister``) when ``pin`` is on, so that host-to-device
copies from it are DMA transfers that run asynchronously on a copy stream
and can be captured in a CUDA graph. Without a GPU the same buffers are plain
memory (the CPU tests run the same code minus the registration).

Pinning is slow (5-8 s for 16 GB on the H100 box, measured twice):
``cudaHostRegister`` faults in and locks every 4 KiB page on one thread. With
``prefault`` (the default) the buffer is first advised to use transparent huge
pages and written by torch's intra-op threads, so the faults happen in parallel
and in 2 MiB units before the driver locks the pages (``benchmarks/sleep_wake.py``
times both ways).

Accounting invariant (checked after every engine test): ``live_bytes`` is the
sum of the sizes of the buffers allocated and not yet freed, and every live
buffer is in ``_live``; ``close`` frees whatever is left.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from dataclasses import dataclass

import torch

from .errors import ClosedError, VTensorMemoryError
from .host import _libc, _mmap, _os_error

_MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | 0x20  # MAP_ANONYMOUS
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: usable from every context
_MADV_HUGEPAGE = 14
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(frozen=True)
class HostBuffer:
    """``nbytes`` of host memory at ``address``; ``tensor`` is a zero-copy uint8 view,
    valid until the buffer is freed."""

    bid: int
    address: int
    nbytes: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class HostMemoryStats:
    pinned: bool
    live_buffers: int
    live_bytes: int
    allocated_bytes: int  # over the allocator's life
    freed_bytes: int

    @property
    def balanced(self) -> bool:
        return self.allocated_bytes - self.freed_bytes == self.live_bytes


class PinnedHostMemory:
    """Allocates page-locked host buffers (``pin=True``, needs CUDA) or plain ones."""

    def __init__(self, pin: bool, prefault: bool = True) -> None:
        if pin and not torch.cuda.is_available():
            raise VTensorMemoryError("pinned host memory needs a CUDA device")
        self.pin = pin
        self.prefault = prefault
        self._lock = threading.Lock()
        self._live: dict[int, HostBuffer] = {}
        self._next = 0
        self._allocated = 0
        self._freed = 0
        self._closed = False

    def alloc(self, nbytes: int) -> HostBuffer:
        """A new buffer of exactly ``nbytes`` (> 0); its contents are zero."""
        if nbytes <= 0:
            raise ValueError(f"a host buffer needs a positive size, got {nbytes}")
        with self._lock:
            if self._closed:
                raise ClosedError("host memory is closed")
            address = _mmap(0, nbytes, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
            view = (ctypes.c_char * nbytes).from_address(address)
            tensor = torch.frombuffer(view, dtype=torch.uint8)
            try:
                if self.pin:
                    if self.prefault:
                        _prefault(address, tensor)
                    _register(address, nbytes)
            except BaseException:
                _libc.munmap(address, nbytes)
                raise
            self._next += 1
            buf = HostBuffer(self._next, address, nbytes, tensor)
            self._live[buf.bid] = buf
            self._allocated += nbytes
            return buf

    def free(self, buf: HostBuffer) -> None:
        """Unregister and unmap ``buf``; no copy from it may be in flight."""
        with self._lock:
            if self._live.pop(buf.bid, None) is None:
                raise VTensorMemoryError(f"host buffer {buf.bid} is not live")
            self._freed += buf.nbytes
            self._release(buf)

    def stats(self) -> HostMemoryStats:
        with self._lock:
            live = sum(b.nbytes for b in self._live.values())
            return HostMemoryStats(self.pin, len(self._live), live, self._allocated, self._freed)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free every live buffer (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for buf in list(self._live.values()):
                self._freed += buf.nbytes
                self._release(buf)
            self._live.clear()

    def _release(self, buf: HostBuffer) -> None:
        if self.pin:
            err = int(torch.cuda.cudart().cudaHostUnregister(buf.address))
            if err != 0:
                raise VTensorMemoryError(f"cudaHostUnregister failed: cudaError {err}")
        if _libc.munmap(buf.address, buf.nbytes) != 0:
            raise _os_error("munmap")


def _prefault(address: int, tensor: torch.Tensor) -> None:
    """Fault the pages in before pinning: huge pages where the kernel allows them (a
    refusal is harmless), written in parallel by torch's threads."""
    _libc.madvise(address, tensor.numel(), _MADV_HUGEPAGE)
    tensor.zero_()


def _register(address: int, nbytes: int) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _REGISTER_PORTABLE))
    if err != 0:
        raise VTensorMemoryError(
            f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (cudaError {err}): "
            "is the host short of memory, or is the locked-memory limit (ulimit -l) low?"
        )
