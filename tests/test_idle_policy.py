"""The bounded-reclamation policy (kvcache/idle_policy.py), torch-free: unit and property tests."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtensor.kvcache.idle_policy import (
    IdleReclaimPolicy,
    IdleSlot,
    ManualClock,
    default_watermark,
)


def test_default_watermark_is_the_larger_of_64_chunks_and_5_percent() -> None:
    assert default_watermark(10_000) == 500
    assert default_watermark(1_000) == 64
    assert default_watermark(1_280) == 64
    assert default_watermark(1_300) == 65
    assert default_watermark(40) == 40  # never more than the budget
    assert default_watermark(0) == 0


def test_manual_clock_moves_only_forward_when_told() -> None:
    clock = ManualClock(5.0)
    assert clock() == 5.0
    clock.advance(1.5)
    assert clock() == 6.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-0.1)
    assert clock() == 6.5


@pytest.mark.parametrize(("watermark", "timeout"), [(-1, 1.0), (4, -0.5), (4, float("nan"))])
def test_bad_settings_are_refused(watermark: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        IdleReclaimPolicy(watermark, timeout)


def test_watermark_cuts_the_oldest_slots_first_from_the_tail() -> None:
    policy = IdleReclaimPolicy(watermark_chunks=6, timeout_s=None)
    slots = [IdleSlot(1, 4, 10.0), IdleSlot(2, 3, 5.0), IdleSlot(3, 2, 12.0)]
    # 9 mappings, 3 over: slot 2 (idle longest) loses all 3; the others keep theirs.
    assert policy.plan(slots, now=100.0) == {2: 0}
    slots = [IdleSlot(1, 4, 10.0), IdleSlot(2, 1, 5.0), IdleSlot(3, 5, 12.0)]
    # 10 mappings, 4 over: slot 2 loses its 1, then slot 1 three of its 4.
    assert policy.plan(slots, now=100.0) == {2: 0, 1: 1}


def test_idle_time_cuts_whole_slots_and_nothing_younger() -> None:
    policy = IdleReclaimPolicy(watermark_chunks=100, timeout_s=2.0)
    slots = [IdleSlot(1, 4, 0.0), IdleSlot(2, 3, 1.0), IdleSlot(3, 2, 1.5)]
    assert policy.plan(slots, now=1.9) == {}
    assert policy.plan(slots, now=2.0) == {1: 0}  # exactly the idle time: expired
    assert policy.plan(slots, now=3.2) == {1: 0, 2: 0}
    assert policy.deadline(slots) == 2.0
    assert policy.deadline([IdleSlot(1, 0, 0.0), IdleSlot(2, 3, 1.0)]) == 3.0
    assert policy.deadline([]) is None
    assert IdleReclaimPolicy(8, None).deadline(slots) is None


def test_zero_watermark_and_zero_timeout_keep_nothing() -> None:
    slots = [IdleSlot(s, random.randint(1, 9), random.random()) for s in range(1, 6)]
    for policy in (IdleReclaimPolicy(0, None), IdleReclaimPolicy(1000, 0.0)):
        assert policy.plan(slots, now=1.0) == {s.slot: 0 for s in slots}


idle_slots = st.lists(
    st.tuples(st.integers(0, 40), st.floats(0.0, 10.0, allow_nan=False)), max_size=12
).map(lambda xs: [IdleSlot(i + 1, c, t) for i, (c, t) in enumerate(xs)])


@settings(max_examples=300, deadline=None)
@given(
    slots=idle_slots,
    watermark=st.integers(0, 200),
    timeout=st.one_of(st.none(), st.floats(0.0, 10.0, allow_nan=False)),
    now=st.floats(0.0, 20.0, allow_nan=False),
)
def test_plan_meets_both_bounds_with_the_fewest_cuts_oldest_first(
    slots: list[IdleSlot], watermark: int, timeout: float | None, now: float
) -> None:
    policy = IdleReclaimPolicy(watermark, timeout)
    plan = policy.plan(slots, now)
    keep = {s.slot: plan.get(s.slot, s.chunks) for s in slots}
    by_slot = {s.slot: s for s in slots}
    # Only cuts, and only slots listed as losing something.
    assert all(0 <= k < by_slot[s].chunks for s, k in plan.items())
    # Both bounds hold.
    assert sum(keep.values()) <= watermark
    assert all(
        keep[s.slot] == 0 for s in slots if timeout is not None and now - s.idle_since >= timeout
    )
    # The fewest cuts: expired slots lose all; beyond that, only the excess goes.
    alive = [s for s in slots if not policy.expired(s, now)]
    expected_kept = min(watermark, sum(s.chunks for s in alive))
    assert sum(keep.values()) == expected_kept
    # Oldest first: a slot that lost chunks to the watermark has no older slot keeping any.
    order = sorted(alive, key=lambda s: (s.idle_since, s.slot))
    for i, s in enumerate(order):
        if keep[s.slot] < s.chunks:
            assert all(keep[o.slot] == 0 for o in order[:i])
    # The deadline is the earliest expiry among slots that keep chunks.
    after = [IdleSlot(s.slot, keep[s.slot], s.idle_since) for s in slots]
    due = policy.deadline(after)
    if timeout is None or not any(keep.values()):
        assert due is None
    else:
        assert due == min(s.idle_since for s in after if s.chunks) + timeout
