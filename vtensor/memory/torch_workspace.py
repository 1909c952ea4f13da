"""TorchWorkspace: torch's caching allocator, drawing its segments from a WorkspaceArena.

A ``torch.cuda.MemPool`` with a pluggable allocator whose ``alloc``/``free`` are
Python callbacks into the arena (the pattern torch itself uses for its UVM pool).
Inside :meth:`TorchWorkspace.use`, every tensor the calling thread allocates on the
device comes from that pool: torch carves tensors out of cached segments as usual,
and asks the arena only when it needs a new segment, so the per-step cost is the
caching allocator's, and the arena (the VMM mapping) is paid when the workspace
grows. :meth:`release_cached` hands the pool's unused segments back, and with them
their chunks to the KV.

Why callbacks and not a compiled allocator: nothing to build, and a segment
allocation (a few per grown step, tens of microseconds of mapping each) dwarfs the
callback's cost.

Threads: torch calls ``alloc``/``free`` under its allocator's lock, and the callbacks
then take the GIL. A thread holding the GIL while it waits on that lock (a torch CUDA
allocation or memory statistic from another thread) could deadlock with one inside a
callback. The engine keeps it from happening: its thread alone allocates on the device
while the pool is on (``memory_stats`` runs on it too; the mapper thread calls the
driver, not torch), and the unified pool excludes tensor parallelism, weight
offload and a shared KV pool (several engines' threads), whose threads would.

CUDA only; on the CPU torch has no pluggable allocator, and the policy that decides
how large the workspace may be is torch-free and tested there.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import PoolExhaustedError
from .workspace_arena import WorkspaceArena

log = logging.getLogger("vtensor.memory")

# void* alloc(size_t size, int device, cudaStream_t stream)
_ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
# void free(void* ptr, size_t size, int device, cudaStream_t stream)
_FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)


class TorchWorkspace:
    """A ``torch.cuda.MemPool`` whose memory is ``arena``'s chunks, on ``device``."""

    def __init__(self, arena: WorkspaceArena, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"a torch workspace pool needs a CUDA device, got {device}")
        self.arena = arena
        # use_mem_pool and synchronize want an index: "cuda" alone means the current one.
        index = torch.cuda.current_device() if device.index is None else device.index
        self.device = torch.device("cuda", index)
        # The callbacks must outlive the allocator: torch keeps only their addresses.
        self._alloc_fn = _ALLOC_FN(self._alloc)
        self._free_fn = _FREE_FN(self._free)
        alloc = ctypes.cast(self._alloc_fn, ctypes.c_void_p).value or 0
        free = ctypes.cast(self._free_fn, ctypes.c_void_p).value or 0
        self._allocator = torch._C._cuda_customAllocator(alloc, free)
        self._pool = torch.cuda.MemPool(allocator=self._allocator)
        _prime_libraries(self.device)
        self.errors = 0  # callback failures other than an exhausted pool (logged)
        self.releases = 0

    @contextmanager
    def use(self) -> Iterator[None]:
        """Route the calling thread's device allocations to the arena."""
        with torch.cuda.use_mem_pool(self._pool, device=self.device):
            yield

    def release_cached(self) -> int:
        """Give the pool's unused cached segments back to the arena, and so their chunks
        to the KV's pool (it synchronizes the device). Returns the chunks released.

        ``torch.cuda.empty_cache`` leaves a live ``MemPool``'s segments alone (measured
        on torch 2.11), so the pool is replaced by a fresh one over the same allocator:
        the old pool's free segments go back when it is destroyed, and those still
        holding tensors when those tensors die and the cache is next emptied.
        """
        before = self.arena.held_chunks
        torch.cuda.synchronize(self.device)
        self._pool = torch.cuda.MemPool(allocator=self._allocator)
        torch.cuda.empty_cache()
        self.releases += 1
        return before - self.arena.held_chunks

    def close(self) -> None:
        """Give the cache back and close the arena: its chunks return to the pool.
        Every tensor allocated in it must be dead (the engine closes after its last step)."""
        if not self.arena.closed:
            self.release_cached()
            self.arena.close()

    @property
    def held_chunks(self) -> int:
        return self.arena.held_chunks

    def _alloc(self, size: int, device: int, stream: int) -> int:
        # Never raise across the C boundary: NULL tells torch the allocation failed,
        # and torch frees its cached segments, retries, then raises OutOfMemoryError.
        try:
            return self.arena.allocate(size)
        except PoolExhaustedError:
            return 0
        except BaseException:
            self.errors += 1
            log.exception("workspace allocation of %d bytes failed", size)
            return 0

    def _free(self, ptr: int, size: int, device: int, stream: int) -> None:
        try:
            self.arena.free(ptr)
        except BaseException:
            self.errors += 1
            log.exception("workspace free of %#x (%d bytes) failed", ptr or 0, size)


def _prime_libraries(device: torch.device) -> None:
    """cuBLAS keeps a workspace per handle and stream, allocated through torch on first
    use and kept for the process's life: made inside the pool it would pin its chunks
    for good (measured: 16 chunks on an H100). Make it here, in torch's own pool."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.ones(16, 16, device=device, dtype=dtype)
        torch.matmul(a, a)  # the side effect is the point
