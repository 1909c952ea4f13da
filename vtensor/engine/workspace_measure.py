"""Measuring the workspace table on the device, once, at warm-up (the unified pool).

For each step size ``t`` in 1, 2, 4, ... ``max_num_batched_tokens`` the engine runs
one real eager prefill step of ``t`` tokens (fresh random prompts, as few requests as
``max_model_len`` allows, one sampled token each). With the pool-backed workspace
(``elastic_setup.attach_workspace``, every CUDA engine with the unified pool) it reads
the arena's peak: exactly the chunks the step's segments took, whatever torch's
default pool holds. Otherwise it reads torch's allocator: the peak bytes allocated
and reserved beyond what was there before (after ``empty_cache``), the larger of the
two. The sampling rows such a step could have
beyond those measured (``min(t, max_num_seqs)`` in all) are added from the logits'
shape (``elastic_setup.logits_bytes``): a prefill cannot have them. KV chunks come from
the VMM pool, not torch's allocator, so they are not counted.

The planner is off while measuring (the KV may use the whole budget: nothing else
runs); the measured table is then installed (``elastic_setup.install``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from vtensor.kvcache.workspace_table import WorkspaceTable, doubling_points

from .elastic_setup import install, logits_bytes
from .llm_engine import LLMEngine
from .params import SamplingParams

log = logging.getLogger("vtensor.engine")


def measure_workspace(engine: LLMEngine) -> WorkspaceTable:
    """Measure the table on the engine's CUDA device and install it; returns it."""
    if engine.runtime.device.type != "cuda":
        raise RuntimeError("the workspace table is measured on CUDA only (the CPU estimates)")
    if engine.scheduler.memory is None:
        raise RuntimeError("the engine has no unified memory pool (unified_memory_pool=False)")
    if engine.has_unfinished():
        raise RuntimeError("measure the workspace before serving: requests are unfinished")
    memory, kv = engine.scheduler.memory, engine.kv
    engine.scheduler.memory = None
    kv.capacity.set_limit(None)
    # While measuring the KV may hold the whole budget, and a pool-backed workspace as
    # much again beside it (chunks are created on demand: only what a step needs).
    scratch, budget = engine.scratch_chunks, kv.geometry.capacity_chunks
    room = budget if engine.runner.workspace is None else 2 * budget
    engine.pool.set_capacity((scratch + room) * kv.geometry.chunk_size)
    points: list[tuple[int, int]] = []
    segments = 0
    try:
        for t in doubling_points(engine.config.max_num_batched_tokens):
            step = _measure_step(engine, t)
            points.append((t, step.nbytes))
            segments = max(segments, step.segments)
    finally:
        engine.scheduler.memory = memory  # install replaces it; restored if measuring fails
        engine.reset_prefix_cache()
        kv.capacity.set_limit(min(memory.kv_capacity, kv.geometry.capacity_chunks))
    table = WorkspaceTable.monotone(points, kv.geometry.chunk_size, "measured", segments)
    install(engine, table)
    if engine.runner.workspace is not None:
        engine.runner.workspace.release_cached()
        engine.pool.set_capacity((scratch + budget) * kv.geometry.chunk_size)
        engine.pool.trim()  # what measuring created beyond the budget goes back
    engine.reclaim_idle()  # an empty step: the pool's capacity follows the KV's share now
    log.info(
        "measured workspace table (tokens: MiB): %s; margin %d chunks a step",
        _describe(table), table.margin_chunks,
    )  # fmt: skip
    return table


@dataclass(frozen=True)
class StepWorkspace:
    """One measured step: its workspace bytes, and the whole-chunk segments the
    pool-backed workspace took for them (0 with torch's own allocator)."""

    nbytes: int
    segments: int


def _measure_step(engine: LLMEngine, tokens: int) -> StepWorkspace:
    """Torch's workspace for one prefill step of ``tokens`` tokens."""
    cfg, rt = engine.config, engine.runtime
    per = min(tokens, rt.max_model_len - 1)
    sizes = [per] * (tokens // per) + ([tokens % per] if tokens % per else [])
    if len(sizes) > cfg.max_num_seqs:
        raise ValueError(
            f"a {tokens}-token step needs {len(sizes)} requests of at most "
            f"{rt.max_model_len - 1} tokens, more than max_num_seqs={cfg.max_num_seqs}"
        )
    vocab = engine.model_config.vocab_size
    rng = random.Random()
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in sizes]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    device = rt.device
    workspace = engine.runner.workspace
    if workspace is not None:
        workspace.release_cached()
        workspace.arena.reset_peak()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    rids = [r for ids in engine.add_requests(prompts, params) for r in ids]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize(device)
    for rid in rids:
        engine.pop(rid)
    if steps > 2:  # one prefill step (and one read with async scheduling)
        log.warning("the %d-token measurement took %d steps, not one", tokens, steps)
    segments = 0
    if workspace is not None:  # the arena's own peak: exactly the chunks the step took
        arena = workspace.arena.stats()
        peak = arena.peak_chunks * workspace.arena.chunk_size
        segments = arena.allocations  # torch keeps the step's segments cached
    else:
        peak = max(
            torch.cuda.max_memory_allocated(device) - allocated,
            torch.cuda.max_memory_reserved(device) - reserved,
        )
    rows = min(tokens, cfg.max_num_seqs)
    extra = logits_bytes(engine.model_config, max(0, rows - len(sizes)))
    return StepWorkspace(max(0, peak) + extra, segments)


def _describe(table: WorkspaceTable) -> str:
    return ", ".join(f"{t}: {b / 2**20:.0f}" for t, b in table.points)
