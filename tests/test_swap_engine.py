"""Swap-out on preemption (the host KV tier) on the CPU: token-identical greedy output
to the same engine without swap (which recomputes) and to a never-preempted run;
a full host tier degrades to recompute; aborting a swapped request leaks nothing."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams

CHUNK = 4096
NEW = 30  # tokens generated per request
# A pool of 24 chunks (the embedded model in fp32: 1 KiB per token, 4 tokens per chunk)
# with 6 requests of 20-30 prompt tokens + 30 generated forces preemption (each test
# asserts that preemption really happened).
TIGHT = dict(chunk_size=CHUNK, kv_cache_bytes=24 * CHUNK, max_num_seqs=4, max_num_batched_tokens=16)


def greedy_tokens(llm: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("prefix", [False, True], ids=["nocache", "cache"])
def test_swap_matches_recompute_and_never_preempted(
    make_llm: Any, async_scheduling: bool, prefix: bool
) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    common = dict(
        dtype="float32",
        async_scheduling=async_scheduling,
        enable_prefix_caching=prefix,
        debug_check_every=1,
    )
    roomy = make_llm(chunk_size=CHUNK, **common)
    ref = greedy_tokens(roomy, prompts, NEW)
    assert roomy.engine.stats().preemptions == 0
    recompute = make_llm(**TIGHT, **common)
    assert greedy_tokens(recompute, prompts, NEW) == ref
    assert recompute.engine.stats().preemptions > 0
    swap = make_llm(**TIGHT, **common, swap_space_bytes=64 * CHUNK, preemption_mode="swap")
    assert greedy_tokens(swap, prompts, NEW) == ref
    s = swap.engine.stats()
    assert s.swap_preemptions > 0 and s.swapped == 0
    assert s.host_tier_used_chunks == s.host_tier_spilled_chunks  # only spilled prefixes
    if not prefix:  # nothing cached: every swap copies, and every one comes back
        assert s.swap_out_bytes > 0 and s.swap_in_bytes == s.swap_out_bytes
        assert s.swap_dropped == 0
    else:  # cached chunks stay on the GPU; a swap whose KV is all cached copies nothing
        assert s.swap_in_bytes <= s.swap_out_bytes


def test_full_host_tier_falls_back_to_recompute(
    make_llm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    ref = greedy_tokens(make_llm(chunk_size=CHUNK, dtype="float32"), prompts, NEW)
    llm = make_llm(  # a tier of 2 chunks: too small for any victim's ~5-15 chunks
        **TIGHT,
        dtype="float32",
        enable_prefix_caching=False,
        swap_space_bytes=2 * CHUNK,
        preemption_mode="swap",
    )
    with caplog.at_level(logging.WARNING, logger="vtensor.engine.swap"):
        assert greedy_tokens(llm, prompts, NEW) == ref
    s = llm.engine.stats()
    assert s.swap_tier_full > 0 and s.preemptions > s.swap_preemptions
    assert any("host KV tier full" in r.message for r in caplog.records)


def test_recompute_mode_never_swaps(make_llm: Any) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    llm = make_llm(
        **TIGHT, dtype="float32", swap_space_bytes=64 * CHUNK, preemption_mode="recompute"
    )
    greedy_tokens(llm, prompts, NEW)
    s = llm.engine.stats()
    assert s.preemptions > 0 and s.swap_preemptions == 0 and s.swap_out_bytes == 0


def test_abort_while_swapped_leaks_nothing(make_llm: Any) -> None:
    llm = make_llm(**TIGHT, dtype="float32", swap_space_bytes=64 * CHUNK, preemption_mode="swap")
    engine = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rids = [
        r for rs in engine.add_requests(random_prompts(6, 400, lo=20, hi=30), params) for r in rs
    ]
    for _ in range(400):
        engine.step()
        if engine.scheduler.swapped:
            break
    assert engine.scheduler.swapped, "no request was swapped out"
    victim = engine.scheduler.swapped[0]
    engine.abort(victim.rid)
    assert engine.swap.planner.tier.extent(victim.rid) is None
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
    tier = engine.swap.planner.tier.usage()
    assert tier.requests == 0 and tier.used_slots == tier.spill_slots  # spilled prefixes only
    for rid in rids:
        engine.pop(rid)


def test_bad_swap_config_is_refused() -> None:
    from vtensor.engine.config import EngineConfig

    with pytest.raises(ValueError, match="swap_space_bytes"):
        EngineConfig(swap_space_bytes=-1)
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="sometimes")


def test_swap_metrics_and_cli_flags(make_llm: Any) -> None:
    import argparse
    import time

    from vtensor.cli_generate import add_engine_args, engine_kwargs
    from vtensor.server.metrics import ServerMetrics

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kwargs = engine_kwargs(p.parse_args(["--swap-space", "0.5", "--preemption-mode", "swap"]))
    assert kwargs["swap_space_bytes"] == 2**29 and kwargs["preemption_mode"] == "swap"
    assert engine_kwargs(p.parse_args([]))["swap_space_bytes"] == 0  # off by default
    llm = make_llm(
        **TIGHT,
        dtype="float32",
        enable_prefix_caching=False,
        swap_space_bytes=64 * CHUNK,
        preemption_mode="swap",
    )
    greedy_tokens(llm, random_prompts(6, 400, lo=20, hi=30), NEW)
    stats = llm.engine.stats()
    text = ServerMetrics().render(stats, time.monotonic())
    assert f"vtensor_swap_out_bytes_total {stats.swap_out_bytes}" in text
    assert f"vtensor_swap_in_bytes_total {stats.swap_in_bytes}" in text
    assert "vtensor_host_tier_chunks_capacity 64" in text
    assert stats.swap_out_bytes > 0


def test_the_cost_model_decides_and_logs_each_choice(
    make_llm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No preemption_mode: the cost model chooses per preemption, and says why. With the
    CPU constants the tiny model's few KiB copy faster than its prefill: it swaps."""
    prompts = random_prompts(6, 400, lo=20, hi=30)
    ref = greedy_tokens(make_llm(chunk_size=CHUNK, dtype="float32"), prompts, NEW)
    llm = make_llm(
        **TIGHT, dtype="float32", enable_prefix_caching=False, swap_space_bytes=64 * CHUNK
    )
    with caplog.at_level(logging.INFO, logger="vtensor.engine.swap"):
        assert greedy_tokens(llm, prompts, NEW) == ref
    cost = llm.engine.swap.planner.cost
    assert cost.mode is None
    lines = [r.message for r in caplog.records if "swap out" in r.message]
    assert len(lines) == llm.engine.stats().swap_preemptions > 0
    assert all(" MiB x2 " in m and " < prefill of " in m for m in lines)
