"""``vtensor bench memory``: the cost of the VMM primitives, raw and through the mapper.

Rows (each the median of ``--repeat`` rounds, after one warm-up round):

* ``sync``: direct backend calls from the caller's thread. ``map+access``
  is measured per chunk (one access call each) and batched (one access call
  over the whole contiguous range).
* ``mapper``: the same work submitted to :class:`AsyncMapper`, timed from
  ``submit`` to the ticket being done, including pool bookkeeping.
* ``overlap`` (CUDA): matmuls timed alone and while the mapper maps and unmaps
  continuously; the slowdown says how much mapping work leaks onto the GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vtensor.memory import (
    AsyncMapper,
    ChunkPool,
    EnsureMapped,
    Map,
    PhysicalBackend,
    Trim,
    Unmap,
    VirtualTensor,
    Warm,
    open_backend,
)

from .report import environment, format_table, write_json


@dataclass(frozen=True)
class Row:
    path: str  # "sync" or "mapper"
    op: str
    chunks: int
    seconds: float

    @property
    def us_per_chunk(self) -> float:
        return self.seconds / self.chunks * 1e6

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sync_round(backend: PhysicalBackend, n: int) -> dict[str, float]:
    """One round of raw backend calls over ``n`` chunks."""
    cs = backend.chunk_size
    va = backend.reserve(n * cs)
    chunks: list[Any] = []
    out = {"create": _timed(lambda: chunks.extend(backend.create_chunk() for _ in range(n)))}

    def map_each() -> None:
        for i, c in enumerate(chunks):
            backend.map(va + i * cs, c)
            backend.set_access(va + i * cs, cs)

    def map_batched() -> None:
        for i, c in enumerate(chunks):
            backend.map(va + i * cs, c)
        backend.set_access(va, n * cs)

    out["map+access (per chunk)"] = _timed(map_each)
    out["unmap"] = _timed(lambda: backend.unmap(va, n * cs))
    out["map+access (batched)"] = _timed(map_batched)
    backend.unmap(va, n * cs)
    out["release"] = _timed(lambda: [backend.release_chunk(c) for c in chunks])
    backend.free_reservation(va, n * cs)
    return out


def mapper_round(pool: ChunkPool, mapper: AsyncMapper, n: int, step: int) -> dict[str, float]:
    """The same work through the mapper; ``step`` chunks per growth batch."""
    cs = pool.chunk_size
    out: dict[str, float] = {}
    with VirtualTensor(pool, n * cs) as vt:
        out["create"] = _timed(lambda: mapper.run([Warm(pool, n)]))
        out["map+access (one batch)"] = _timed(lambda: mapper.run([Map(vt, 0, n * cs)]))
        out["unmap"] = _timed(lambda: mapper.run([Unmap(vt, 0, n * cs)]))

        def grow() -> None:  # how an engine grows KV: many small batches, waited at the end
            tickets = [
                mapper.submit([EnsureMapped(vt, 0, end * cs)]) for end in range(step, n + 1, step)
            ]
            for t in tickets:
                t.wait()

        out[f"map+access ({step}-chunk batches)"] = _timed(grow)
        mapper.run([Unmap(vt, 0, vt.mapped_chunks * cs)])
    out["release"] = _timed(lambda: mapper.run([Trim(pool, 0)]))
    return out


def overlap(pool: ChunkPool, mapper: AsyncMapper, n: int, matmuls: int) -> dict[str, float]:
    """Matmul time alone vs. while the mapper maps/unmaps ``n`` chunks in a loop."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def run_matmuls() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(matmuls):
            torch.mm(a, b)
        end.record()
        return start, end

    run_matmuls()[1].synchronize()  # warm-up
    s, e = run_matmuls()
    e.synchronize()
    alone = s.elapsed_time(e) / 1e3
    cs, mapped, busy0 = pool.chunk_size, 0, mapper.stats().busy_s
    with VirtualTensor(pool, n * cs) as vt:
        s, e = run_matmuls()
        while not e.query():
            mapper.run([Map(vt, 0, n * cs), Unmap(vt, 0, n * cs)])
            mapped += n
        e.synchronize()
    with_mapping = s.elapsed_time(e) / 1e3
    busy = mapper.stats().busy_s - busy0
    flops = 2 * 8192**3 * matmuls
    return {
        "matmul_alone_s": alone,
        "matmul_with_mapper_s": with_mapping,
        "slowdown_pct": (with_mapping / alone - 1) * 100,
        "matmul_tflops_alone": flops / alone / 1e12,
        "mapper_busy_s": busy,
        "chunks_mapped_and_unmapped": mapped,
        "mapping_overlapped_pct": min(100.0, 100 * (1 - max(0.0, with_mapping - alone) / busy))
        if busy > 0
        else 0.0,
    }


def _median_rows(path: str, rounds: list[dict[str, float]], n: int) -> list[Row]:
    return [Row(path, op, n, statistics.median(r[op] for r in rounds)) for op in rounds[0]]


def run(backend_name: str, chunks: int, repeat: int, step: int, matmuls: int) -> dict[str, Any]:
    """Run every measurement; returns the JSON payload."""
    backend = open_backend(backend_name)
    pool = ChunkPool(backend, 4 * chunks * backend.chunk_size)
    results: dict[str, Any] = {"backend": backend_name, "chunk_size": backend.chunk_size}
    with AsyncMapper(backend) as mapper:
        sync_round(backend, min(chunks, 32))  # warm-up: first cuMemCreate is slow
        mapper_round(pool, mapper, min(chunks, 32), step)
        rows = _median_rows("sync", [sync_round(backend, chunks) for _ in range(repeat)], chunks)
        rounds = [mapper_round(pool, mapper, chunks, step) for _ in range(repeat)]
        rows += _median_rows("mapper", rounds, chunks)
        if backend_name == "cuda":
            results["overlap"] = overlap(pool, mapper, chunks, matmuls)
        results["mapper_stats"] = asdict(mapper.stats())
    stats = pool.stats()
    results["leak_check"] = {
        "in_use": stats.in_use,
        "references": stats.references,
        "balanced": stats.balanced,
        "ok": stats.in_use == 0,
    }
    pool.close()
    backend.close()
    results["rows"] = [
        {**asdict(r), "us_per_chunk": r.us_per_chunk, "chunks_per_s": r.chunks_per_s} for r in rows
    ]
    return results


def main(args: Any) -> int:
    backend = args.backend or ("cuda" if torch.cuda.is_available() else "host")
    print(
        f"vtensor bench memory: backend={backend}, chunks={args.chunks}, "
        f"repeat={args.repeat} (median of rounds)",
        flush=True,
    )
    res = run(backend, args.chunks, args.repeat, args.step, args.matmuls)
    table = [
        (r["path"], r["op"], r["chunks"], r["us_per_chunk"], r["chunks_per_s"]) for r in res["rows"]
    ]
    print(format_table(["path", "op", "chunks", "us/chunk", "chunks/s"], table))
    if "overlap" in res:
        o = res["overlap"]
        print(
            f"\noverlap: {o['chunks_mapped_and_unmapped']} chunks mapped+unmapped during "
            f"{o['matmul_with_mapper_s'] * 1e3:.1f} ms of matmuls "
            f"(alone {o['matmul_alone_s'] * 1e3:.1f} ms, {o['matmul_tflops_alone']:.0f} "
            f"TFLOP/s): slowdown {o['slowdown_pct']:.2f}%, mapper busy "
            f"{o['mapper_busy_s'] * 1e3:.1f} ms, {o['mapping_overlapped_pct']:.1f}% hidden"
        )
    leak = res["leak_check"]
    print(f"\nleak check: {leak['in_use']} chunks still in use -> {'OK' if leak['ok'] else 'LEAK'}")
    res["env"] = environment()
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0 if leak["ok"] else 1
