"""What ``vtensor bench offload`` times on one engine: bandwidths, decode steps and
prefills under each way of running the offloaded layers.

Modes (each timed on the same engine, so the same placement and weights):

* ``graphs``: the prefetcher, decode steps replaying CUDA graphs that hold the copies;
* ``eager``: the prefetcher, decode steps run eagerly (the graphs set aside);
* ``naive``: accelerate's CPU offload: before each offloaded layer, a synchronous copy
  of its weights from pageable host memory (a second, ordinary host copy), eager;
* ``naive-pinned``: the same synchronous copies from the pinned buffers: what is left
  of the naive peer's cost once its memory is pinned (the overlap's share).

Prefill is never graphed, so ``graphs`` and ``eager`` time the same prefill. It is
timed two ways: ``prefill_ms``, one prompt from an idle engine (synchronized before and
after: a latency, host preamble and tail included), and ``prefill_stream_ms``, prompts
back to back, one full prefill a step, like the decode windows (a throughput: a step's
host work overlaps the GPU's, and the weight copies the ring leaves in flight at the
end of a step overlap the next one). ``copy_trace`` times each weight copy on the copy
stream during either, to show where a step's time goes.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.memory import PinnedHostMemory
from vtensor.models.offload.hooks import LayerHooks
from vtensor.models.offload.streams import CudaCopyQueue

from .decode_table import decode_steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device: torch.device, nbytes: int, pinned: bool, reps: int = 5) -> float:
    """GB/s of one host-to-device copy of ``nbytes`` (median of ``reps``), from pinned
    (``PinnedHostMemory``, as the offloaded weights) or pageable memory; on the CPU, a
    host memcpy."""
    host = PinnedHostMemory(pin=device.type == "cuda")
    try:
        src = host.alloc(nbytes).tensor if pinned else torch.empty(nbytes, dtype=torch.uint8)
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = []
        for _ in range(reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times[1:]) / 1e9
    finally:
        host.close()


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float | None:
    """Dense matmul throughput (TFLOP/s) at ``n``³: the prefill's compute ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


@contextmanager
def mode(
    engine: LLMEngine, name: str, peers: dict[str, LayerHooks] | None = None
) -> Iterator[None]:
    """Run the engine in ``name`` (one of MODES) for the duration; ``peers`` keeps the
    naive peers' hooks between calls (the pageable one copies every offloaded weight)."""
    graphs = engine.runner.graphs
    if name != "graphs":
        engine.runner.graphs = None
    off = engine.offload
    peer: AbstractContextManager[None] = nullcontext()
    if name.startswith("naive"):
        assert off is not None, "the naive peers need offloaded layers"
        peers = {} if peers is None else peers
        if name not in peers:
            peers[name] = off.sync_hooks(pageable=name == "naive")
        peer = off.using(engine.model, peers[name])
    try:
        with peer:
            yield
    finally:
        engine.runner.graphs = graphs


def decode_row(engine: LLMEngine, batch: int, ctx: int, steps: int) -> dict[str, Any]:
    """One decode window (``decode_table.decode_steps``: the batch is checked constant)."""
    row = decode_steps(engine, batch, ctx, steps)
    return {k: row[k] for k in ("step_ms", "weight_bytes", "kv_bytes_read", "warmup_steps")}


def prefill_ms(engine: LLMEngine, tokens: int, reps: int) -> float:
    """Median time of a ``tokens``-token prompt's prefill (and its one sampled token),
    from an idle engine, over ``reps`` runs after one warm-up."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    times = []
    for _ in range(reps + 1):
        engine.add_request(fresh_prompt(vocab, tokens), params)
        _sync(engine.runtime.device)
        t0 = time.perf_counter()
        finished = []
        while engine.has_unfinished():
            finished += [o.rid for o in engine.step() if o.finished]
        _sync(engine.runtime.device)
        times.append(time.perf_counter() - t0)
        for rid in finished:
            engine.pop(rid)
    return statistics.median(times[1:] or times) * 1e3  # reps 0: the one run


def prefill_stream_ms(engine: LLMEngine, tokens: int, prompts: int, warm: bool = True) -> float:
    """Time per prefill of ``prompts`` ``tokens``-token prompts queued at once, as many
    whole prompts a step as ``max_num_batched_tokens`` holds (checked: no prompt is
    split), after an untimed round of as many when ``warm`` (their KV slots mapped, so
    the timed steps map nothing new)."""
    per_step = engine.config.max_num_batched_tokens // tokens
    if per_step < 1:
        raise ValueError(f"max_num_batched_tokens {engine.config.max_num_batched_tokens} "
                         f"< {tokens}: a prompt would not prefill in one step")  # fmt: skip
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    seconds = 0.0
    for _ in range(2 if warm else 1):
        batch = [fresh_prompt(vocab, tokens) for _ in range(prompts)]
        rids = [r for group in engine.add_requests(batch, params) for r in group]
        steps0 = engine.stats().steps
        _sync(engine.runtime.device)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync(engine.runtime.device)
        seconds = time.perf_counter() - t0
        for rid in rids:
            engine.pop(rid)
        launched = engine.stats().steps - steps0
        if launched != -(-prompts // per_step):  # a split prompt or an extra step
            raise RuntimeError(f"{prompts} prompts of {tokens} took {launched} steps")
    return seconds / prompts * 1e3


def fresh_prompt(vocab: int, tokens: int) -> list[int]:
    """Random token ids. Every timed prefill needs its own: the engine's prefix cache
    keeps earlier prompts' blocks, and a repeated prompt would prefill one token (the
    naive peers' prefills once did, timed after ours on the same prompts)."""
    rng = random.Random()
    return [rng.randrange(vocab) for _ in range(tokens)]


@contextmanager
def copy_trace(engine: LLMEngine) -> Iterator[dict[str, Any]]:
    """Time every weight copy queued inside the block on the copy stream (CUDA eager
    fills; nothing elsewhere). On exit (after a synchronize) the dict holds, in ms from
    the block's start on the GPU: ``first_copy_start_ms``, ``last_copy_end_ms``,
    ``copy_busy_ms`` (sum of the copies), ``copy_gbs`` (their bytes over that) and
    ``gpu_span_ms`` (the compute stream's span)."""
    out: dict[str, Any] = {}
    off = engine.offload
    copies = off.copies if off is not None else None
    if not isinstance(copies, CudaCopyQueue):
        yield out
        return
    trace: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(engine.runtime.device)
    copies.trace = trace
    begin.record()
    try:
        yield out
    finally:
        end.record()
        copies.trace = None
        torch.cuda.synchronize(engine.runtime.device)
    out.update(trace_summary(begin, end, trace))


def trace_summary(
    begin: torch.cuda.Event,
    end: torch.cuda.Event,
    trace: list[tuple[torch.cuda.Event, torch.cuda.Event, int]],
) -> dict[str, Any]:
    spans = [(begin.elapsed_time(s), begin.elapsed_time(e), n) for s, e, n in trace]
    busy = sum(e - s for s, e, _ in spans)
    return {
        "fills": len(spans),
        "gpu_span_ms": begin.elapsed_time(end),
        "first_copy_start_ms": min((s for s, _, _ in spans), default=None),
        "last_copy_end_ms": max((e for _, e, _ in spans), default=None),
        "copy_busy_ms": busy,
        "copy_gbs": sum(n for _, _, n in spans) / busy / 1e6 if busy > 0 else None,
    }


def weights_gpu_bytes(engine: LLMEngine) -> int:
    """Weight bytes the engine holds on its device: resident tensors (each storage once)
    plus the whole ring; the KV cache is not counted."""
    off = engine.offload
    ring = (off.ring.slot(0).data_ptr(), off.ring.nbytes) if off is not None else (0, 0)
    seen: dict[int, int] = {}
    for p in engine.model.parameters():
        ptr = p.data_ptr()
        if p.device.type == engine.runtime.device.type and not ring[0] <= ptr < sum(ring):
            seen[ptr] = p.numel() * p.element_size()
    return sum(seen.values()) + ring[1]
