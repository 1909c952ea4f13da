"""What ``benchmarks/gemv_bench.py`` measures: the linear layers' shapes of a model
(per tensor-parallel rank) and the grid of GEMV configurations its ``--sweep`` tries.

Torch-free apart from the config types, so the CPU tests check them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vtensor.kernels.gemv_config import GemvConfig, choose_config, choose_split
from vtensor.models.config import shape_config
from vtensor.models.parallel import ModelShard

# Named shape sets: (model shape, tensor-parallel size); rank 0's slice is measured
# (every rank's linear shapes are equal).
SHAPE_SETS = {"8b": ("llama3-8b", 1), "70b-tp2": ("llama3-70b", 2)}


@dataclass(frozen=True)
class GemvShape:
    """One linear layer: ``y[M, n] = x[M, k] @ W[n, k]^T``."""

    model: str
    layer: str
    n: int
    k: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.layer}"


def model_shapes(set_name: str) -> list[GemvShape]:
    """The q/k/v, o, gate/up, down and lm_head shapes of one rank of ``set_name``."""
    model, tp = SHAPE_SETS[set_name]
    cfg = shape_config(model)
    shard = ModelShard.of(cfg, 0, tp)
    h = cfg.hidden_size
    layers = {
        "qkv": (shard.q_size + 2 * shard.kv_size, h),
        "o": (h, shard.q_size),
        "gate_up": (2 * shard.intermediate_size, h),
        "down": (h, shard.intermediate_size),
        "lm_head": (shard.vocab_rows, h),
    }
    return [GemvShape(set_name, name, n, k) for name, (n, k) in layers.items()]


def sweep_grid(m: int, n: int, k: int, num_sms: int) -> list[GemvConfig]:
    """The configurations ``--sweep`` times for ``m`` rows: the table's choice first,
    then broadcast tiles whose fp32 accumulator stays ≤ 128 registers a thread (loads
    prefetched 2 steps ahead, or not at all), one-warp ``step`` tiles, and ``dot`` tiles;
    split-K by the table's rule, plus twice that."""
    grid = [choose_config(m, n, k, num_sms)]
    if m > 8:  # a broadcast tile of > 8 rows spills its registers: dot tiles only
        return _dot_grid(grid, n, k, num_sms, wide=True)
    block_m = 1 << max(0, (m - 1).bit_length())
    for warps in (2, 4):
        for block_n in (1, 2, 4, 8, 16):
            if 2 <= block_m * block_n <= 16:  # accumulator: block_m·block_n·8 floats
                for stages in (1, 3):  # 1: no prefetch (occupancy hides latency)
                    grid.append(GemvConfig(block_n, 256 * warps, warps, "deferred", 1, stages))
    grid += [GemvConfig(4, 256, 1, "step"), GemvConfig(8, 512, 1, "step")]
    return _dot_grid(grid, n, k, num_sms)


def _dot_grid(
    grid: list[GemvConfig], n: int, k: int, num_sms: int, wide: bool = False
) -> list[GemvConfig]:
    """``grid`` and the ``dot`` tiles: split-K by the table's rule and twice it; with
    ``wide`` (M > 8, where only dot tiles serve) also 8 warps and deeper pipelines."""
    shapes = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 3, 4), (128, 128, 3, 4)]
    if wide:
        shapes += [(64, 128, 6, 4), (128, 128, 4, 8), (128, 256, 3, 8), (256, 128, 3, 8)]
    for block_n, block_k, stages, warps in shapes:
        split = choose_split(-(-n // block_n), k, block_k, num_sms)
        for s in sorted({split, 2 * split}):
            if k >= s * block_k:
                grid.append(GemvConfig(block_n, block_k, warps, "dot", s, stages))
    return list(dict.fromkeys(grid))  # duplicates dropped, order kept


def best_per_bucket(rows: Iterable[Mapping[str, Any]]) -> dict[int, tuple[str, float]]:
    """For each M: the configuration with the best geometric-mean fraction of the
    per-(shape, M) best time, over the shapes where every candidate was timed.
    ``rows``: sweep records with ``m``, ``shape``, ``config`` and ``us``."""
    best: dict[tuple[int, str], float] = {}
    times: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["m"], r["shape"])
        best[key] = min(best.get(key, math.inf), r["us"])
        times[r["m"]][r["config"]][r["shape"]] = r["us"]
    out: dict[int, tuple[str, float]] = {}
    for m, by_cfg in times.items():
        shapes = set().union(*(s.keys() for s in by_cfg.values()))
        scores = {
            cfg: math.exp(sum(math.log(best[(m, s)] / t[s]) for s in shapes) / len(shapes))
            for cfg, t in by_cfg.items()
            if set(t) == shapes
        }
        if scores:
            cfg = max(scores, key=lambda c: scores[c])
            out[m] = (cfg, scores[cfg])
    return out
