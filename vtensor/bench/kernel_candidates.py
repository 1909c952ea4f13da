"""Decode launch candidates swept by ``vtensor bench kernels --decode-configs``.

A candidate is a :class:`DecodeConfig` (block, warps, stages, fewest tokens per
split) and the waves of programs the split count aims at
(``choose_num_splits(..., waves=)``). Each is timed under CUDA-graph replay at every
decode point, so the defaults can be picked from one GPU run. ``c0``, the first,
is what ``decode_attention`` runs by default at head_dim 128.

The grid is pruned from block_n 32/64 × warps 4/8 × stages 2/3/4 × min_split
64/128/256 (36) to one change at a time from the default, plus the pairs that
belong together (smaller blocks pipeline deeper; more warps want more stages):
a sweep of ten configs and three more wave counts costs about a second per point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vtensor.kernels.decode_config import DecodeConfig, choose_num_splits
from vtensor.kernels.splitk import MAX_WAVES


@dataclass(frozen=True)
class DecodeCandidate:
    config: DecodeConfig = field(default_factory=DecodeConfig)
    waves: int = MAX_WAVES  # choose_num_splits's target; MAX_WAVES is the engine's

    def __post_init__(self) -> None:
        if self.waves < 1:
            raise ValueError(f"waves must be >= 1, got {self.waves}")

    @property
    def name(self) -> str:
        suffix = "" if self.waves == MAX_WAVES else f"+waves{self.waves}"
        return self.config.name + suffix

    def num_splits(self, batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
        return choose_num_splits(batch, kv_heads, max_len, num_sms, waves=self.waves)


def _c(block_n: int = 64, warps: int = 4, stages: int = 3, min_split: int = 64) -> DecodeConfig:
    return DecodeConfig(block_n, warps, stages, min_split)


DEFAULT = DecodeCandidate()
GRID: tuple[DecodeCandidate, ...] = (
    DEFAULT,
    DecodeCandidate(_c(stages=2)),
    DecodeCandidate(_c(stages=4)),
    DecodeCandidate(_c(warps=8)),
    DecodeCandidate(_c(warps=8, stages=4)),
    DecodeCandidate(_c(block_n=32)),
    DecodeCandidate(_c(block_n=32, stages=4)),
    DecodeCandidate(_c(min_split=128)),  # short requests on fewer, fuller splits
    DecodeCandidate(_c(min_split=256)),
    DecodeCandidate(_c(block_n=32, stages=4, min_split=128)),
    DecodeCandidate(waves=1),  # a smaller grid: fewer splits for a long request
    DecodeCandidate(waves=2),
    DecodeCandidate(waves=8),  # more splits: fuller GPU at small batch, more merge
)
MAX_GRID_WAVES = max(c.waves for c in GRID)

_NAME = re.compile(r"n(\d+)-w(\d+)-s(\d+)-m(\d+)(?:\+waves(\d+))?")


def parse_candidate(name: str) -> DecodeCandidate:
    """``DecodeCandidate.name`` back to the candidate: ``n64-w4-s3-m64`` (a
    ``DecodeConfig.name``), optionally ``+waves8``. Any valid config, not only the grid's."""
    match = _NAME.fullmatch(name.strip())
    if match is None:
        raise ValueError(
            f"bad decode config name {name!r}: expected e.g. n64-w4-s3-m64 or "
            "n64-w4-s3-m64+waves8 (block_n, num_warps, num_stages, min_split[, waves])"
        )
    block_n, warps, stages, min_split, waves = match.groups()
    config = DecodeConfig(int(block_n), int(warps), int(stages), int(min_split))
    return DecodeCandidate(config, int(waves) if waves else MAX_WAVES)


def parse_candidates(spec: str) -> list[DecodeCandidate]:
    """``--decode-configs``: "" (none), "all" (:data:`GRID`), or comma-separated names.
    The default comes first whenever any is asked for: the table compares with it."""
    spec = spec.strip()
    if not spec:
        return []
    wanted = list(GRID) if spec == "all" else [parse_candidate(n) for n in spec.split(",")]
    return list(dict.fromkeys([DEFAULT, *wanted]))  # default first, duplicates dropped
