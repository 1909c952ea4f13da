"""``vtensor bench collectives``: the bus bandwidth of the tensor-parallel group, and
what one decode step's collectives cost.

It starts one process per GPU with the engine's own rendezvous and group
(``vtensor.distributed``: NCCL, NVLink multicast off), then measures on it:

* **bus bandwidth**: an all-reduce of each ``--sizes-mib`` (bf16), nccl-tests'
  definition: ``busbw = bytes / time * 2 (N - 1) / N``. The largest size gives
  the link's bandwidth.
* **a decode step's collectives**, for each ``--shapes`` model and ``--batches``
  size: exactly what a TP decode step of that model runs, in a CUDA graph as the
  engine replays it: the embedding's all-reduce and two per layer (o, down) of
  ``[B, hidden]``, and the logits' all-gather of ``[B, ceil(vocab / N)]``. Its
  time per step, against the time its bytes take at the measured bus bandwidth:
  decode messages are small, so the gap is NCCL's per-collective latency.

On the CPU (``--device cpu``, gloo) the same runs eagerly, timed by the wall
clock: a smoke test of the code, not a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from vtensor.distributed import LaunchSpec, TPGroup, multicast_off
from vtensor.distributed.launch import (
    connect_store,
    host_store,
    init_group,
    leave_group,
    wait_for_ranks,
)
from vtensor.distributed.procs import WorkerMonitor, spawn_workers, stop_workers
from vtensor.models.config import shape_config

from .report import environment, format_table, write_json


def step_collectives(name: str, batch: int, size: int) -> dict[str, Any]:
    """One decode step's collectives for model ``name`` on ``size`` ranks (bf16)."""
    cfg = shape_config(name)
    return {
        "all_reduces": 2 * cfg.num_layers + 1,
        "all_reduce_bytes": batch * cfg.hidden_size * 2,
        "gather_bytes": batch * -(-cfg.vocab_size // size) * 2,  # each rank's part
        "hidden": cfg.hidden_size,
        "vocab_rows": -(-cfg.vocab_size // size),
    }


def bus_seconds(step: dict[str, Any], size: int, busbw: float) -> float:
    """Time a step's collectives take at bus bandwidth ``busbw`` (B/s), no latency: an
    all-reduce moves ``2 (N-1)/N`` of its bytes per rank, an all-gather ``(N-1)`` parts."""
    moved = step["all_reduces"] * step["all_reduce_bytes"] * 2 * (size - 1) / size
    moved += step["gather_bytes"] * (size - 1)
    return moved / busbw


def _timed(fn: Callable[[], None], iters: int, device: torch.device, group: TPGroup) -> float:
    """Seconds per call of ``fn`` (after the ranks line up), on rank 0's clock."""
    fn()  # warm-up (and NCCL's first use of these buffers)
    group.all_reduce(torch.zeros(1, device=device))
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _graphed(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (as the engine's decode steps are), on the GPU."""
    if device.type != "cuda":
        return fn
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


def measure(group: TPGroup, device: torch.device, args: Any) -> dict[str, Any]:
    """Every rank runs this in lockstep; rank 0's numbers are the result."""
    n, dtype = group.size, torch.bfloat16
    bus = []
    for mib in args.sizes_mib:
        x = torch.zeros(mib * 2**20 // 2, dtype=dtype, device=device)

        def reduce(x: torch.Tensor = x) -> None:
            group.all_reduce(x)

        t = _timed(reduce, args.iters, device, group)
        algbw = mib * 2**20 / t
        bus.append({"mib": mib, "ms": t * 1e3, "algbw_gbs": algbw / 1e9,
                    "busbw_gbs": algbw * 2 * (n - 1) / n / 1e9})  # fmt: skip
    busbw = max(b["busbw_gbs"] for b in bus) * 1e9
    steps = []
    for name in args.shapes:
        for batch in args.batches:
            s = step_collectives(name, batch, n)
            h = torch.zeros(batch, s["hidden"], dtype=dtype, device=device)
            logits = torch.zeros(batch, s["vocab_rows"], dtype=dtype, device=device)

            def one_step(h: torch.Tensor = h, logits: torch.Tensor = logits,
                         count: int = s["all_reduces"]) -> None:  # fmt: skip
                for _ in range(count):
                    group.all_reduce(h)
                group.gather_columns(logits)

            t = _timed(_graphed(one_step, device), args.iters, device, group)
            ideal = bus_seconds(s, n, busbw)
            steps.append({"shape": name, "batch": batch, **s, "step_ms": t * 1e3,
                          "at_busbw_ms": ideal * 1e3,
                          "per_all_reduce_us": t / (s["all_reduces"] + 1) * 1e6})  # fmt: skip
    return {"tp": n, "device": str(device), "bus": bus, "busbw_gbs": busbw / 1e9, "steps": steps}


def _rank_main(spec: LaunchSpec, device_type: str, args: Any, rank: int) -> None:
    """A spawned rank: join, measure in lockstep with rank 0, leave."""
    multicast_off()
    device = _device(device_type, rank)
    group = init_group(spec, connect_store(spec), rank, device)
    measure(group, device, args)
    leave_group()


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def run(args: Any) -> dict[str, Any]:
    """Rank 0 here, the other ranks spawned; returns rank 0's measurements."""
    multicast_off()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    store, spec = host_store(LaunchSpec(args.tensor_parallel_size))
    workers = spawn_workers(_rank_main, range(1, spec.world_size), (spec, device_type, args))
    monitor = WorkerMonitor(workers)
    grace = 5.0  # a failed run: the workers may wait in a collective for good
    try:
        wait_for_ranks(store, range(1, spec.world_size), spec.timeout_s, monitor.raise_if_dead)
        device = _device(device_type, 0)
        result = measure(init_group(spec, store, 0, device), device, args)
        monitor.stop()  # the workers leave with us and exit
        leave_group()  # with theirs: NCCL's destroy is collective
        grace = 60.0
    finally:
        monitor.stop()
        stop_workers(workers, grace)
    return result


def main(args: Any) -> int:
    if args.tensor_parallel_size < 2:
        raise ValueError("bench collectives needs --tensor-parallel-size >= 2")
    result = run(args)
    print(f"all-reduce over {result['tp']} ranks ({result['device']}), bf16:")
    print(format_table(["MiB", "ms", "algbw GB/s", "busbw GB/s"],
                       [(b["mib"], b["ms"], b["algbw_gbs"], b["busbw_gbs"])
                        for b in result["bus"]]))  # fmt: skip
    print(f"\none decode step's collectives (graph replay), vs their bytes at "
          f"{result['busbw_gbs']:.0f} GB/s bus bandwidth:")  # fmt: skip
    print(format_table(
        ["shape", "batch", "all-reduces", "KiB each", "step ms", "at busbw ms", "us each"],
        [(s["shape"], s["batch"], s["all_reduces"], s["all_reduce_bytes"] / 1024, s["step_ms"],
          s["at_busbw_ms"], s["per_all_reduce_us"]) for s in result["steps"]],
    ))  # fmt: skip
    result["env"] = environment()
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
