"""Prefix-cache spill on the CPU engine: a conversation whose cached blocks were
evicted by other traffic (spilled to the host tier) and then sent again restores
them, and gives the same greedy tokens (fp32) as the engine with the cache off and
as the engine with spill off (cache on, no host tier); host hits are counted apart
from GPU hits; an abort while a restore is in flight leaks nothing; a tier too
small degrades to plain eviction."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams

CHUNK = 4096  # the embedded model in fp32: 1 KiB per token, 4 tokens per chunk and block
NEW = 8
# 24 chunks hold about two 40-token conversations: the other traffic evicts the first.
POOL = dict(chunk_size=CHUNK, kv_cache_bytes=24 * CHUNK, max_num_seqs=2, dtype="float32")


def conversations(llm: Any, waves: list[list[list[int]]]) -> list[list[list[int]]]:
    """Each wave generated after the previous one finished (greedy)."""
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    return [[o.outputs[0].token_ids for o in llm.generate(w, params)] for w in waves]


def traffic() -> list[list[list[int]]]:
    """A first conversation, four others that push its blocks out of the GPU cache,
    then the first again (the same prompt, and a longer follow-up of it)."""
    first, *others = random_prompts(5, 400, lo=36, hi=40)
    follow_up = first + random_prompts(1, 400, lo=4, hi=8)[0]
    return [[first], *([p] for p in others), [first], [follow_up]]


def abort_while_restoring(engine: Any, prompt: list[int], params: SamplingParams) -> None:
    """Add ``prompt`` (a host hit), step once (it is admitted: its host blocks'
    copy-in is queued, the step not read yet), abort it at once, and run the engine
    dry; the books balance before and after."""
    (rid,) = engine.add_request(prompt, params)
    restored = engine.stats().prefix_cache_restored_blocks
    engine.step()
    assert engine.stats().prefix_cache_restored_blocks > restored
    engine.abort(rid)
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
    engine.pop(rid)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_spilled_prefix_matches_cache_off_and_spill_off(
    make_llm: Any, async_scheduling: bool
) -> None:
    waves = traffic()
    common = dict(POOL, async_scheduling=async_scheduling, debug_check_every=1)
    off = make_llm(**common, enable_prefix_caching=False)
    want = conversations(off, waves)
    no_spill = make_llm(**common)  # the cache on, no host tier: evicted blocks are lost
    assert conversations(no_spill, waves) == want
    spill = make_llm(**common, swap_space_bytes=64 * CHUNK)
    assert conversations(spill, waves) == want
    s, n = spill.engine.stats(), no_spill.engine.stats()
    assert s.prefix_cache_spilled_blocks > 0 and s.prefix_cache_restored_blocks > 0
    assert s.prefix_cache_host_hits > 0, "the resent conversation hit no spilled block"
    assert s.prefix_cache_hits > n.prefix_cache_hits  # the host tier kept what was lost
    assert s.prefix_cache_gpu_hits + s.prefix_cache_host_hits == s.prefix_cache_hits
    assert s.prefix_cache_host_hits == s.prefix_cache_restored_blocks * 4  # 4-token blocks
    assert s.spill_out_bytes > 0 and s.spill_in_bytes == s.prefix_cache_restored_blocks * CHUNK
    assert s.preemptions == n.preemptions == 0  # one at a time: no hit from a recompute
    assert s.swap_out_bytes == 0
    assert s.host_tier_spilled_chunks == s.prefix_cache_host_blocks > 0
    assert s.host_tier_used_chunks == s.host_tier_spilled_chunks


def test_spill_metrics(make_llm: Any) -> None:
    from vtensor.server.metrics import ServerMetrics

    llm = make_llm(**POOL, swap_space_bytes=64 * CHUNK)
    conversations(llm, traffic())
    s = llm.engine.stats()
    text = ServerMetrics().render(s, time.monotonic())
    assert f"vtensor_prefix_cache_host_hits_total {s.prefix_cache_host_hits}" in text
    assert f"vtensor_prefix_cache_gpu_hits_total {s.prefix_cache_gpu_hits}" in text
    assert f"vtensor_host_tier_spilled_chunks {s.host_tier_spilled_chunks}" in text
    assert s.prefix_cache_host_hits > 0 and s.host_tier_spilled_chunks > 0


def test_abort_while_restoring_leaks_nothing(make_llm: Any) -> None:
    llm = make_llm(**POOL, swap_space_bytes=64 * CHUNK, async_scheduling=True)
    engine = llm.engine
    waves = traffic()
    conversations(llm, waves[:-2])
    assert engine.stats().prefix_cache_host_blocks > 0
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    abort_while_restoring(engine, waves[-2][0], params)
    tier = engine.swap.planner.tier.usage()
    assert tier.used_slots == tier.spill_slots == engine.stats().host_tier_spilled_chunks
    engine.check_integrity()
    assert engine.reset_prefix_cache()  # everything goes back: GPU chunks and host slots
    assert engine.swap.planner.tier.usage().used_slots == 0
    engine.arena.wait_all()
    assert engine.pool.stats().in_use == engine.kv.geometry.chunks_for(1)  # scratch only


def test_tiny_tier_drops_instead_of_spilling(make_llm: Any) -> None:
    waves = traffic()
    want = conversations(make_llm(**POOL, enable_prefix_caching=False), waves)
    llm = make_llm(**POOL, swap_space_bytes=CHUNK // 2)  # not one host slot
    assert conversations(llm, waves) == want
    s = llm.engine.stats()
    assert s.prefix_cache_spilled_blocks == 0 and s.prefix_cache_host_hits == 0
    assert s.prefix_cache_evicted_chunks > 0
