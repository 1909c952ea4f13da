"""RecomputeWaste (``vtensor/bench/recompute_waste.py``): shares and the swap ceiling
against hand-computed values, the extremes, bad input; and ``benchmarks/swap.py``'s
summary prints it for each pass."""

from __future__ import annotations

import math
import random

import pytest

from vtensor.bench.recompute_waste import RecomputeWaste


def test_shares_and_ceiling() -> None:
    computed = random.randint(1000, 10**6)
    prefill = random.randint(100, computed)
    redo = random.randint(0, prefill)
    w = RecomputeWaste(redo, prefill, computed)
    assert w.share_of_prefill == pytest.approx(redo / prefill)
    assert w.share_of_computed == pytest.approx(redo / computed)
    assert w.swap_ceiling == pytest.approx(computed / (computed - redo))
    d = w.as_dict()
    assert d["recomputed_prompt_tokens"] == redo and d["swap_throughput_ceiling"] == w.swap_ceiling
    assert f"x{w.swap_ceiling:.3f}" in w.line()


def test_extremes() -> None:
    none = RecomputeWaste(0, 0, 0)
    assert none.share_of_prefill == none.share_of_computed == 0.0 and none.swap_ceiling == 1.0
    assert RecomputeWaste(0, 50, 80).swap_ceiling == 1.0
    assert math.isinf(RecomputeWaste(10, 10, 10).swap_ceiling)
    assert RecomputeWaste(25, 50, 100).swap_ceiling == pytest.approx(4 / 3)  # a quarter


@pytest.mark.parametrize("args", [(-1, 5, 9), (6, 5, 9), (1, 10, 9)])
def test_inconsistent_counts_are_refused(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="recomputed"):
        RecomputeWaste(*args)
