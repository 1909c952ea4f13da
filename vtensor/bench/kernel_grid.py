"""The points ``vtensor bench kernels`` runs: head shapes, batches, contexts, extend
spans and decode candidates, from the command line (``--quick`` for a subset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .kernel_arenas import HeadConfig
from .kernel_candidates import DecodeCandidate, parse_candidates

HEAD_CONFIGS = {
    "llama3-8b": HeadConfig("llama3-8b (32/8)", 32, 8),  # GQA, Llama-3-8B's attention
    "mha": HeadConfig("mha (32/32)", 32, 32),
}


@dataclass(frozen=True)
class GridDefaults:
    heads: tuple[str, ...]
    batches: tuple[int, ...]
    ctxs: tuple[int, ...]


FULL = GridDefaults(("llama3-8b", "mha"), (1, 8, 32, 128), (1024, 4096, 16384, 32768))
# A quick look: GQA only, two points at 64 MiB per call (where the ceiling goal starts),
# no extend.
QUICK = GridDefaults(("llama3-8b",), (1, 8, 32), (4096, 16384))


@dataclass(frozen=True)
class KernelGrid:
    heads: tuple[HeadConfig, ...]
    batches: tuple[int, ...]
    ctxs: tuple[int, ...]
    candidates: tuple[DecodeCandidate, ...] = ()
    extend: bool = True
    extend_batch: int = 4
    prefixes: tuple[int, ...] = (0, 1024, 4096, 16384)
    news: tuple[int, ...] = (128, 512, 2048)

    def __post_init__(self) -> None:
        if not (self.heads and self.batches and self.ctxs):
            raise ValueError("the decode grid needs head configs, batches and contexts")
        if min(*self.batches, *self.ctxs, self.extend_batch, *self.news) < 1:
            raise ValueError("batches, contexts and new spans must be positive")
        if self.prefixes and min(self.prefixes) < 0:
            raise ValueError("extend prefixes must be >= 0")


def grid_from_args(args: Any) -> KernelGrid:
    """The grid of ``vtensor bench kernels``' options. ``--quick`` picks a small default
    grid (and no extend); an explicit ``--batches``/``--ctxs``/``--head-configs`` wins
    over either default."""
    quick = bool(getattr(args, "quick", False))
    base = QUICK if quick else FULL
    names = getattr(args, "head_configs", None) or base.heads
    unknown = [n for n in names if n not in HEAD_CONFIGS]
    if unknown:
        raise ValueError(f"unknown head configs {unknown}: expected some of {list(HEAD_CONFIGS)}")
    return KernelGrid(
        heads=tuple(HEAD_CONFIGS[n] for n in names),
        batches=tuple(getattr(args, "batches", None) or base.batches),
        ctxs=tuple(getattr(args, "ctxs", None) or base.ctxs),
        candidates=tuple(parse_candidates(getattr(args, "decode_configs", "") or "")),
        extend=not (quick or getattr(args, "skip_extend", False)),
        extend_batch=getattr(args, "extend_batch", 4),
        prefixes=tuple(getattr(args, "prefixes", None) or (0, 1024, 4096, 16384)),
        news=tuple(getattr(args, "news", None) or (128, 512, 2048)),
    )
