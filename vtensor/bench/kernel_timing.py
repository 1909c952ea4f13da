"""Decode timing for ``vtensor bench kernels``: CUDA-graph replay and eager, side by side.

* **graph** (the engine's path): ``R`` decode calls, one per layer view (or per
  peer token pool), captured back to back in one ``torch.cuda.CUDAGraph`` and
  replayed; ms per call is the median over samples. ``R`` (:func:`rotation`) makes
  a replay read ≥ 256 MiB (5x the H100's 50 MiB L2), capped by the model's layers:
  no call finds the previous calls' K/V in L2, and the host's launch work is gone,
  as in a decode step.
* **eager**: ``triton.testing.do_bench`` on the first call alone (L2 flushed before
  each run; the host's launch work included), the method of the earlier tables.

Every peer's first call is also checked against a reference output (FA2's on the
same K/V): a fast wrong kernel is reported, never counted as a result. A peer that
fails (or cannot be captured) is recorded and the run goes on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

MiB = 1 << 20
ROTATE_BYTES = 256 * MiB  # K/V read per graph replay, at least (where the layers allow)
MAX_ERR = 2e-2  # bf16 decode against FA2 (the GPU tests' bound is 1e-2 against fp32)
SAMPLES, SAMPLE_MS = 7, 10.0  # graph timing: samples, and the replay time of each
Call = Callable[[], object]


def rotation(call_bytes: int, layers: int) -> int:
    """Calls per graph replay, one per layer: enough that a replay reads ≥ ROTATE_BYTES
    of K/V, at most ``layers`` (a decode step reads each layer once)."""
    if call_bytes < 1 or layers < 1:
        raise ValueError(f"need call_bytes and layers ≥ 1, got {call_bytes}, {layers}")
    return max(1, min(layers, -(-ROTATE_BYTES // call_bytes)))


def replays_per_sample(replay_ms: float, sample_ms: float = SAMPLE_MS) -> int:
    """Replays timed back to back in one sample: about ``sample_ms`` of GPU time, so
    event timing resolution does not matter, between 2 and 200."""
    return max(2, min(200, int(sample_ms / max(replay_ms, 1e-3))))


def eager_ms(fn: Call) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def graph_ms(calls: Sequence[Call], samples: int = SAMPLES) -> float:
    """Median ms per call of ``calls`` captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) off the capture, as torch asks
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = replays_per_sample(start.elapsed_time(end))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(calls)))
    del graph  # its private memory pool goes back to the allocator's cache
    return statistics.median(times)


def rel_err(out: object, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; NaN or a non-tensor output is infinitely wrong."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return float("inf")
    err = float((out.float() - ref).norm() / ref.norm())
    return err if err == err else float("inf")  # NaN: wrong, and must compare as such


def time_peer(
    res: dict[str, Any],
    peer: str,
    calls: Sequence[Call],
    ref: torch.Tensor | None = None,
    eager: bool = True,
) -> None:
    """``res[peer_graph_ms]`` (all ``calls``, graph replay) and ``res[peer_ms]`` (eager,
    the first call; unless ``eager`` is False). With ``ref``, also ``res[peer_err]``:
    the first call's relative error against it, checked before any timing. A failure
    is recorded as ``res[peer_error]`` instead of ending the run."""
    try:
        if ref is not None:  # the run checks what it times: a fast wrong kernel is no result
            res[f"{peer}_err"] = rel_err(calls[0](), ref)
        if eager:
            res[f"{peer}_ms"] = eager_ms(calls[0])
        res[f"{peer}_graph_ms"] = graph_ms(calls)
    except Exception as exc:  # a peer that cannot run here (or be captured) is reported
        res[f"{peer}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def wrong(err: float) -> bool:
    """An output this far from FA2's is wrong (NaN and inf included)."""
    return not err < MAX_ERR
