"""Host backend: CUDA VMM semantics on the CPU, through memfd + mmap.

Physical chunks are page ranges of one ``memfd`` file; a reservation is a
``PROT_NONE`` anonymous mapping; mapping a chunk is ``mmap(MAP_FIXED |
MAP_SHARED)`` of its file range over the reservation. Two mappings of the same
file range alias exactly as two CUDA mappings of one ``cuMemCreate`` handle
do, so sharing, growth at a fixed address and unmapping behave the same as on
the GPU, and the whole stack is testable without one.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

import torch

from .backend import PhysicalBackend, PhysicalChunk
from .errors import VTensorMemoryError

_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED = mmap.MAP_SHARED
_MAP_PRIVATE = mmap.MAP_PRIVATE
_MAP_ANONYMOUS = 0x20
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _os_error(call: str) -> VTensorMemoryError:
    code = ctypes.get_errno()
    return VTensorMemoryError(f"{call} failed: {errno.errorcode.get(code, code)}")


def _offset(chunk: PhysicalChunk) -> int:
    """A host chunk's handle: its offset in the memfd."""
    # Checked, not int()-converted: a CUDA chunk's handle converts to int too.
    if not isinstance(chunk.handle, int):
        raise TypeError(f"{chunk!r} is not a host chunk")
    return chunk.handle


def _mmap(va: int, nbytes: int, prot: int, flags: int, fd: int, offset: int) -> int:
    addr = _libc.mmap(va or None, nbytes, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        raise _os_error("mmap")
    return int(addr)


class HostBackend(PhysicalBackend):
    """memfd/mmap implementation of :class:`PhysicalBackend` (Linux only)."""

    name = "host"

    def __init__(self, chunk_size: int = 2 << 20) -> None:
        page = mmap.PAGESIZE
        if chunk_size <= 0 or chunk_size % page:
            raise ValueError(f"chunk_size must be a positive multiple of {page}, got {chunk_size}")
        self._chunk_size = chunk_size
        self._fd = os.memfd_create("vtensor-chunks", os.MFD_CLOEXEC)
        self._lock = threading.Lock()
        self._free_offsets: list[int] = []  # file ranges released, reused first
        self._file_size = 0
        self._next_cid = 0

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def create_chunk(self) -> PhysicalChunk:
        with self._lock:
            if self._free_offsets:
                offset = self._free_offsets.pop()
            else:
                offset = self._file_size
                # The file is sparse: pages are allocated when first touched.
                os.ftruncate(self._fd, offset + self._chunk_size)
                self._file_size = offset + self._chunk_size
            self._next_cid += 1
            return PhysicalChunk(cid=self._next_cid, handle=offset)

    def release_chunk(self, chunk: PhysicalChunk) -> None:
        offset = _offset(chunk)
        # Punch a hole so the pages really go back to the OS, as cuMemRelease does.
        if _libc.fallocate(self._fd, _FALLOC_PUNCH_HOLE, offset, self._chunk_size) != 0:
            raise _os_error("fallocate(PUNCH_HOLE)")
        with self._lock:
            self._free_offsets.append(offset)

    def can_map_chunks_of(self, other: PhysicalBackend) -> bool:
        # mmap is process-wide: another host backend's memfd ranges map over our
        # reservations as well as its own (the CPU stand-in for two CUDA locations).
        return isinstance(other, HostBackend) and other.chunk_size == self.chunk_size

    def resident_bytes(self) -> int:
        """Bytes of physical memory the chunks hold now, as the kernel counts them (the
        memfd's allocated blocks): pages touched and not yet punched out. Independent
        of the pool's own accounting, so tests measure what was really given back."""
        return os.fstat(self._fd).st_blocks * 512

    def reserve(self, nbytes: int) -> int:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        return _mmap(0, nbytes, _PROT_NONE, flags, -1, 0)

    def free_reservation(self, va: int, nbytes: int) -> None:
        if _libc.munmap(va, nbytes) != 0:
            raise _os_error("munmap")

    def map(self, va: int, chunk: PhysicalChunk) -> None:
        offset = _offset(chunk)
        _mmap(va, self._chunk_size, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, self._fd, offset)

    def set_access(self, va: int, nbytes: int) -> None:
        if _libc.mprotect(va, nbytes, _PROT_RW) != 0:
            raise _os_error("mprotect")

    def unmap(self, va: int, nbytes: int) -> None:
        # Replace the file mapping with a fresh PROT_NONE one: the address stays
        # reserved (nobody else can be handed it) but holds no memory.
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        _mmap(va, nbytes, _PROT_NONE, flags, -1, 0)

    def byte_view(self, va: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = (ctypes.c_char * nbytes).from_address(va)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
