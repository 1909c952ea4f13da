"""The host tier's books and the swap-vs-recompute cost model (torch-free)."""

from __future__ import annotations

import random

import pytest

from vtensor.kvcache.host_tier import SlotHostTier, SwapState
from vtensor.kvcache.swap_policy import ModelCost, SwapCostModel

LLAMA3_8B = ModelCost(params=8_030_000_000, num_layers=32, attn_width=4096)


def test_prefill_flops_matmuls_plus_causal_attention() -> None:
    m = ModelCost(params=1000, num_layers=2, attn_width=8)
    t = random.randint(1, 5000)
    assert m.prefill_flops(t) == 2 * 1000 * t + 2 * 2 * 8 * t * t


def test_swap_wins_when_copying_is_faster_than_prefill() -> None:
    # An H100-like machine: ~25 GB/s pinned copies, ~600 TFLOP/s of bf16.
    model = SwapCostModel(LLAMA3_8B, copy_bytes_per_s=25e9, flops_per_s=6e14)
    tokens = random.randint(2000, 8000)
    kv = tokens * 128 * 1024  # Llama-3-8B: 128 KiB of KV per token
    d = model.decide(kv, tokens)
    expect_swap = 2 * kv / 25e9 < LLAMA3_8B.prefill_flops(tokens) / 6e14
    assert d.swap is expect_swap
    assert d.swap_s == pytest.approx(2 * kv / 25e9)
    assert d.recompute_s == pytest.approx(LLAMA3_8B.prefill_flops(tokens) / 6e14)
    assert ("<" in d.reason) is d.swap


def test_the_extremes_decide_both_ways() -> None:
    slow_bus = SwapCostModel(LLAMA3_8B, copy_bytes_per_s=1e6, flops_per_s=1e15)
    assert not slow_bus.decide(1 << 30, 100).swap
    slow_gpu = SwapCostModel(LLAMA3_8B, copy_bytes_per_s=1e12, flops_per_s=1e9)
    assert slow_gpu.decide(1 << 20, 100).swap
    assert slow_gpu.decide(0, 1).swap  # nothing private to copy: swapping is free


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_mode_overrides_the_cost(mode: str) -> None:
    model = SwapCostModel(LLAMA3_8B, 1e6, 1e15, mode=mode)
    d = model.decide(1 << 30, 10)
    assert d.swap is (mode == "swap") and "preemption_mode" in d.reason


def test_bad_rates_and_modes_are_refused() -> None:
    with pytest.raises(ValueError):
        SwapCostModel(LLAMA3_8B, 0.0, 1.0)
    with pytest.raises(ValueError):
        SwapCostModel(LLAMA3_8B, 1.0, 1.0, mode="always")
    with pytest.raises(ValueError):
        ModelCost(params=0, num_layers=1, attn_width=1)


def test_host_tier_reserves_frees_and_refuses_when_full() -> None:
    tier = SlotHostTier(5)
    a = tier.begin_out(1, first=2, count=3)
    assert a is not None and a.host_slots == (0, 1, 2) and a.state is SwapState.COPYING_OUT
    assert tier.begin_out(2, first=0, count=3) is None  # full: nothing changed
    assert tier.usage().used_slots == 3 and tier.usage().requests == 1
    assert tier.end_out(1).state is SwapState.HOST
    with pytest.raises(ValueError, match="not copying-out"):
        tier.end_out(1)
    assert tier.begin_in(1).state is SwapState.COPYING_IN
    tier.end_in(1)
    assert tier.extent(1) is None and tier.usage().used_slots == 0
    with pytest.raises(ValueError):
        tier.drop(1)
    assert not tier.violations()


def test_host_tier_random_sequences_balance() -> None:
    cap = random.randint(1, 12)
    tier, live = SlotHostTier(cap), {}
    for _ in range(300):
        rid = random.randrange(6)
        if rid in live and random.random() < 0.5:
            ext = tier.extent(rid)
            assert ext is not None
            if ext.state is SwapState.COPYING_OUT:
                tier.end_out(rid)
            elif ext.state is SwapState.HOST:
                tier.begin_in(rid)
            else:
                tier.end_in(rid)
                del live[rid]
        elif rid in live:
            tier.drop(rid)  # abort, in whatever state
            del live[rid]
        else:
            count, free = random.randint(0, 4), cap - tier.usage().used_slots
            ext = tier.begin_out(rid, random.randint(0, 3), count)
            assert (ext is None) == (count > free)
            if ext is not None:
                live[rid] = count
        assert not tier.violations()
        assert tier.usage().used_slots == sum(live.values())
    for rid in list(live):
        tier.drop(rid)
    assert tier.usage().used_slots == 0
