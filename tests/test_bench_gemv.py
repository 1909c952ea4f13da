"""``benchmarks/gemv_bench.py``'s pieces on the CPU: the layer shapes it measures, the
sweep grid, and the per-M summary (the timings need a GPU: ``test_gemv_gpu.py`` runs
every sweep configuration there)."""

from __future__ import annotations

import pytest

from vtensor.bench.gemv_cases import best_per_bucket, model_shapes, sweep_grid
from vtensor.kernels.gemv_config import choose_config


def test_shapes_are_issue_11_and_16s() -> None:
    shapes = {s.name: (s.n, s.k) for name in ("8b", "70b-tp2") for s in model_shapes(name)}
    assert shapes == {
        "8b/qkv": (6144, 4096), "8b/o": (4096, 4096), "8b/gate_up": (28672, 4096),
        "8b/down": (4096, 14336), "8b/lm_head": (128256, 4096),
        "70b-tp2/qkv": (5120, 8192), "70b-tp2/o": (8192, 4096),
        "70b-tp2/gate_up": (28672, 8192), "70b-tp2/down": (8192, 14336),
        "70b-tp2/lm_head": (64128, 8192),
    }  # fmt: skip
    with pytest.raises(KeyError):
        model_shapes("405b")


@pytest.mark.parametrize("m", range(1, 9))
def test_sweep_grid_starts_with_the_table_and_has_every_mode(m: int) -> None:
    for n, k in [(4096, 4096), (128256, 4096), (5120, 8192)]:
        grid = sweep_grid(m, n, k, 132)
        assert grid[0] == choose_config(m, n, k, 132)
        assert len(set(grid)) == len(grid)
        assert {c.mode for c in grid} == {"deferred", "step", "dot"}
        assert all(k >= c.split_k * c.block_k for c in grid if c.mode == "dot")
        # broadcast accumulators stay <= 128 fp32 registers a thread
        assert all(c.block_m(m) * c.block_n * 8 <= 128 for c in grid[1:] if c.mode == "deferred")


def test_best_per_bucket_is_the_geomean_winner() -> None:
    rows = [
        {"m": 1, "shape": "a", "config": "x", "us": 10.0},
        {"m": 1, "shape": "b", "config": "x", "us": 30.0},
        {"m": 1, "shape": "a", "config": "y", "us": 12.0},
        {"m": 1, "shape": "b", "config": "y", "us": 20.0},
        {"m": 1, "shape": "a", "config": "z", "us": 1.0},  # not timed on every shape
        {"m": 2, "shape": "a", "config": "x", "us": 5.0},
    ]
    best = best_per_bucket(rows)
    # x: (1/10 · 20/30)^½ = 0.258; y: (1/12 · 20/20)^½ = 0.289 (z is left out)
    assert best[1][0] == "y" and best[1][1] == pytest.approx((1 / 12) ** 0.5)
    assert best[2] == ("x", 1.0)
