"""Warm-up: compile what a serving engine would otherwise compile on its first users."""

from __future__ import annotations

import time

from .llm_engine import LLMEngine
from .params import SamplingParams
from .tp_driver import talking_to
from .tp_worker import Precompile, precompile


def warm_up(engine: LLMEngine) -> float:
    """Two short requests, the second joining while the first decodes, then the decode
    kernel's split variants: the first prefill, decode and mixed step compile the fused
    and Triton kernels (seconds on a GPU), which would otherwise land on the first
    users' TTFT. With the unified memory pool on a GPU it first measures the workspace
    table (``workspace_measure.py``). Leaves no request behind; returns the seconds it
    took."""
    t0 = time.perf_counter()
    if engine.scheduler.memory is not None and engine.runtime.device.type == "cuda":
        from .workspace_measure import measure_workspace

        measure_workspace(engine)  # the unified pool's table, measured (the CPU estimates)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    rids = engine.add_request([t % vocab for t in range(1, 33)], params)
    engine.step()  # prefill
    rids += engine.add_request([t % vocab for t in range(2, 66)], params)
    while engine.has_unfinished():  # a mixed step, then decodes
        engine.step()
    for rid in rids:
        engine.pop(rid)
    with talking_to(engine.workers):  # every rank compiles its own kernels
        if engine.workers is not None:
            engine.workers.send(Precompile())
        precompile(engine.parts)
    return time.perf_counter() - t0
