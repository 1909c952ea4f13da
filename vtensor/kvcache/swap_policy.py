"""Swap or recompute: the cost model that decides what a preemption does (torch-free).

A preempted request either drops its KV and recomputes it later (a prefill of its
computed tokens), or has its private chunks copied to the host tier and back. The
model compares the two times:

    swap:      2 x bytes / copy_bytes_per_s          (out now, in at resume)
    recompute: prefill_flops(tokens) / flops_per_s

with ``prefill_flops(t) = 2 * params * t + 2 * layers * attn_width * t**2`` (the
matmuls, plus causal attention's QK^T and PV: 4 * layers * width * t^2 / 2).
The rates are inputs: the engine measures them once at start on CUDA and uses
the documented constants below on the CPU. The copy time counts only the bytes
that must move (private chunks); cached chunks stay mapped (see ``swap_chunks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

# CPU constants (no measurement: CPU runs are tests). Rough orders of a laptop core:
# memcpy at ~5 GB/s, fp32 matmul at ~50 GFLOP/s.
CPU_COPY_BYTES_PER_S = 5e9
CPU_FLOPS_PER_S = 5e10

PREEMPTION_MODES = ("swap", "recompute")


@dataclass(frozen=True)
class ModelCost:
    """What a token costs to prefill: the model's sizes in plain integers."""

    params: int  # parameters a token's forward multiplies through
    num_layers: int
    attn_width: int  # query heads x head dim

    def __post_init__(self) -> None:
        if min(self.params, self.num_layers, self.attn_width) <= 0:
            raise ValueError(f"model cost sizes must be positive: {self}")

    def prefill_flops(self, tokens: int) -> float:
        return 2.0 * self.params * tokens + 2.0 * self.num_layers * self.attn_width * tokens**2


@dataclass(frozen=True)
class SwapDecision:
    swap: bool
    swap_s: float  # estimated copy time, out and back in
    recompute_s: float  # estimated prefill time
    reason: str  # one line for the log


@dataclass(frozen=True)
class SwapCostModel:
    model: ModelCost
    copy_bytes_per_s: float
    flops_per_s: float
    mode: str | None = None  # vLLM's preemption_mode: None decides by cost

    def __post_init__(self) -> None:
        if self.copy_bytes_per_s <= 0 or self.flops_per_s <= 0:
            raise ValueError("copy_bytes_per_s and flops_per_s must be positive")
        if self.mode is not None and self.mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES} or None")

    def decide(self, swap_bytes: int, recompute_tokens: int) -> SwapDecision:
        """Swap ``swap_bytes`` out and back, or recompute ``recompute_tokens`` tokens."""
        swap_s = 2.0 * swap_bytes / self.copy_bytes_per_s
        recompute_s = self.model.prefill_flops(recompute_tokens) / self.flops_per_s
        if self.mode is not None:
            why = f"preemption_mode={self.mode}"
            return SwapDecision(self.mode == "swap", swap_s, recompute_s, why)
        swap = swap_s < recompute_s
        cmp = "<" if swap else ">="
        why = (
            f"copy {swap_bytes / 2**20:.1f} MiB x2 {swap_s * 1e3:.2f} ms {cmp} "
            f"prefill of {recompute_tokens} tokens {recompute_s * 1e3:.2f} ms"
        )
        return SwapDecision(swap, swap_s, recompute_s, why)
