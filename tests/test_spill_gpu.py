"""Prefix-cache spill on the GPU: a conversation's cached blocks, evicted by other
traffic, are copied from VMM chunks (through the staging range) to pinned host memory
on the copy stream, and restored into fresh chunks of a new request's slot, read by
CUDA-graph decode and the Triton kernels under async scheduling. fp32, compared by
the greedy walk (engines that batch differently may flip a near-tie) with the engine
with the cache off and the engine with spill off. With every copy delayed ~20 ms on
the copy stream, or every forward pass delayed ~20 ms on the compute stream, the
outputs stay the same: no step reads a restored chunk before its copy-in lands, no
copy-out reads a block a step in flight still writes, and no spilled chunk returns to
the pool (or is written over in place) before its copy-out. An abort while a restore's
copy is in flight leaks nothing and corrupts nothing.

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.gpu_delays import CHUNK, OVER, slow_copy, slow_forward, spin_cycles_for
from tests.greedy_walk import assert_greedy_close
from tests.test_spill_engine import abort_while_restoring
from vtensor import SamplingParams
from vtensor.engine import swap as swap_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# OVER in fp32: 32 KiB per token, 64 tokens per 2 MiB chunk (one chunk per cache
# block). A pool of 24 chunks holds about two conversations of ~560 + 64 tokens: the
# others evict the first one's blocks, which a 64-chunk host tier keeps.
KW = dict(device="cuda", dtype="float32", max_num_seqs=2, max_model_len=1024,
          async_scheduling=True, debug_check_every=1, chunk_size=CHUNK)  # fmt: skip
NEW = 64


def waves() -> list[list[int]]:
    """The first conversation, four others one at a time, the first again, and a
    follow-up of it."""
    first, *others = random_prompts(5, 512, lo=520, hi=560)
    return [first, *others, first, first + random_prompts(1, 512, lo=40, hi=60)[0]]


def run(llm: Any, prompts: list[list[int]]) -> list[Any]:
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    return [llm.generate([p], params)[0] for p in prompts]


@pytest.mark.parametrize("slow", ["none", "copies", "forward"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_spilled_prefix_matches_cache_off_and_spill_off_on_cuda(
    eager: bool, slow: str, tmp_path: Path, make_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    prompts = waves()
    kw = dict(KW, enforce_eager=eager, kv_cache_bytes=24 * CHUNK)
    want = run(make_llm(str(tmp_path), enable_prefix_caching=False, **kw), prompts)
    no_spill = make_llm(str(tmp_path), **kw)
    without = run(no_spill, prompts)
    assert_greedy_close(without, want, "spill off vs cache off")
    cycles = spin_cycles_for(0.02)
    if slow == "copies":
        monkeypatch.setattr(swap_module, "copy_bytes", slow_copy(cycles))
    llm = make_llm(str(tmp_path), swap_space_bytes=64 * CHUNK, **kw)
    assert (llm.engine.runner.graphs is None) == eager
    if slow == "forward":
        slow_forward(llm.engine.runner, cycles, monkeypatch)
    got = run(llm, prompts)
    assert_greedy_close(got, want, "spill vs cache off")
    assert_greedy_close(got, without, "spill vs spill off")
    s, n = llm.engine.stats(), no_spill.engine.stats()
    assert s.prefix_cache_spilled_blocks > 0 and s.prefix_cache_restored_blocks > 0
    assert s.prefix_cache_host_hits > 0 and s.prefix_cache_hits > n.prefix_cache_hits
    assert s.spill_in_bytes == s.prefix_cache_restored_blocks * CHUNK
    assert s.host_tier_used_chunks == s.host_tier_spilled_chunks > 0


def test_abort_while_restore_copy_in_flight_on_cuda(
    tmp_path: Path, make_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy lands ~50 ms late, so the aborted request's restore is still in
    flight when it is aborted; the chunks it was copying into go back to the pool and
    are reused by the next requests, whose outputs must still be right."""
    make_checkpoint(tmp_path, "llama", **OVER)
    prompts = waves()
    kw = dict(KW, kv_cache_bytes=24 * CHUNK)
    want = run(make_llm(str(tmp_path), enable_prefix_caching=False, **kw), prompts)
    monkeypatch.setattr(swap_module, "copy_bytes", slow_copy(spin_cycles_for(0.05)))
    llm = make_llm(str(tmp_path), swap_space_bytes=64 * CHUNK, **kw)
    engine = llm.engine
    assert_greedy_close(run(llm, prompts[:5]), want[:5], "before the abort")
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    abort_while_restoring(engine, prompts[5], params)  # its copy-in ~50 ms per run
    # Other traffic reuses the freed chunks, then the conversation comes back.
    assert_greedy_close(run(llm, prompts[1:3] + prompts[5:]), want[1:3] + want[5:], "after")
    engine.check_integrity()
    assert engine.reset_prefix_cache()
    assert engine.swap.planner.tier.usage().used_slots == 0


def test_concurrent_spills_wait_for_their_writers_on_cuda(
    tmp_path: Path, make_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All requests at once, two running, every forward pass ~20 ms late on the compute
    stream: a block cached by a step still on the GPU may be evicted (spilled) by the
    next admissions, and each spill copy-out waits on the GPU only for the marks of
    its blocks' writers (``spill_writers.py``), the host for the copy alone. The
    outputs match the engine's with the cache off: no copy-out read KV a step still
    wrote. The spy counts the copies by what they waited for (printed)."""
    make_checkpoint(tmp_path, "llama", **OVER)
    first = waves()[:5]
    prompts = first + [p + random_prompts(1, 512, lo=8, hi=16)[0] for p in first]
    kw = dict(KW, kv_cache_bytes=24 * CHUNK)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    want = make_llm(str(tmp_path), enable_prefix_caching=False, **kw).generate(prompts, params)
    llm = make_llm(str(tmp_path), swap_space_bytes=64 * CHUNK, **kw)
    slow_forward(llm.engine.runner, spin_cycles_for(0.02), monkeypatch)
    swapper = llm.engine.spill.swapper
    original, waits = swapper.copy_out_queued, {"everything": 0, "marks": 0, "nothing": 0}

    def spy(ranges: Any, spill: bool = False, after: Any = None) -> Any:
        if spill:
            waits["everything" if after is None else "marks" if after else "nothing"] += 1
        return original(ranges, spill=spill, after=after)

    monkeypatch.setattr(swapper, "copy_out_queued", spy)
    got = llm.generate(prompts, params)
    print("spill copy-outs by their wait:", waits)
    assert_greedy_close(got, want, "spill (concurrent, slow forward) vs cache off")
    s = llm.engine.stats()
    assert s.prefix_cache_spilled_blocks > 0 and s.prefix_cache_restored_blocks > 0
    assert sum(waits.values()) > 0
