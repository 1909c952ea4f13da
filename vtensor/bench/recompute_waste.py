"""Recompute waste: how much a pass's preemptions by recompute cost, and so the most
that swapping them instead could gain (torch-free; ``benchmarks/swap.py``).

From the engine's token counters over the pass (``EngineStats``): the tokens prefilled
again after a preemption by recompute (``recomputed_prompt_tokens``), their share of
all prefilled tokens, and the throughput ceiling of swap over recompute,
``1 / (1 - f)`` where ``f`` is the share of GPU time spent recomputing.

The approximation: ``f`` is taken as the recomputed tokens' share of *every* token the
steps computed (prefill and decode), i.e. GPU time proportional to tokens computed. A
decode token costs more than a prefill token (decode steps are memory-bound), so on
that count the true share is lower and the ceiling lower still, and a swap pays its
copies besides. Not modelled: per-step overheads (a recomputing engine runs more
steps), and queueing, which recomputation lengthens: a run can beat the figure (the
CPU smoke run of ``benchmarks/swap.py``, whose steps cost about the same whatever
their tokens, did). On the GPU it says how much there is to win: if recomputation
is, say, 2% of the tokens, swap's throughput can gain little more than 2%.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecomputeWaste:
    recomputed_tokens: int  # prefilled again after a preemption by recompute
    prefill_tokens: int  # every prefilled token (the re-prefills included)
    computed_tokens: int  # every token computed (prefill and decode)

    def __post_init__(self) -> None:
        if not 0 <= self.recomputed_tokens <= self.prefill_tokens <= self.computed_tokens:
            raise ValueError(
                f"need 0 <= recomputed ({self.recomputed_tokens}) <= prefill "
                f"({self.prefill_tokens}) <= computed ({self.computed_tokens}) tokens"
            )

    @property
    def share_of_prefill(self) -> float:
        """Recomputed tokens over all prefilled tokens (0 without any)."""
        return self.recomputed_tokens / self.prefill_tokens if self.prefill_tokens else 0.0

    @property
    def share_of_computed(self) -> float:
        """Recomputed tokens over every computed token: the GPU time share, by tokens."""
        return self.recomputed_tokens / self.computed_tokens if self.computed_tokens else 0.0

    @property
    def swap_ceiling(self) -> float:
        """``1 / (1 - share_of_computed)``: swap's most throughput over recompute's."""
        if self.computed_tokens and self.recomputed_tokens == self.computed_tokens:
            return float("inf")
        return 1.0 / (1.0 - self.share_of_computed)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "recomputed_prompt_tokens": self.recomputed_tokens,
            "prefill_tokens": self.prefill_tokens,
            "computed_tokens": self.computed_tokens,
            "recomputed_share_of_prefill": self.share_of_prefill,
            "recomputed_share_of_computed": self.share_of_computed,
            "swap_throughput_ceiling": self.swap_ceiling,
        }

    def line(self) -> str:
        """The pass's summary: tokens, shares and the ceiling."""
        return (
            f"recomputed {self.recomputed_tokens} tok = {self.share_of_prefill:.1%} of "
            f"{self.prefill_tokens} prefilled, {self.share_of_computed:.1%} of all computed "
            f"-> swap ceiling x{self.swap_ceiling:.3f} (GPU time ~ tokens)"
        )
