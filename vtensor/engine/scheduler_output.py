"""What the scheduler plans for one step (torch-free): the spans to compute, and the
requests and KV commands the engine applies before it runs them (``scheduler.py``
builds it; ``StepLoop.launch`` applies it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtensor.kvcache.host_tier import HostExtent
from vtensor.kvcache.manager import KVCommand
from vtensor.kvcache.prefix_cache import SpillOut

from .request import Request
from .swap_plan import SwapPlan


@dataclass(frozen=True)
class ScheduledSpan:
    req: Request
    start: int  # first token position computed this step
    num_tokens: int
    samples: bool  # the span reaches the end of the request, so a token is sampled

    @classmethod
    def next_of(cls, req: Request, start: int, num_tokens: int) -> ScheduledSpan:
        """``num_tokens`` of ``req`` from ``start`` (fixed at scheduling time)."""
        return cls(req, start, num_tokens, start + num_tokens == req.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class Admission:
    """A waiting request given a slot; its first ``num_cached`` tokens' KV came from the
    prefix cache, so it computes from there."""

    req: Request
    num_cached: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. The engine applies it: requests first (preempted; with a host
    tier, unswapped, swapped out with their copies, swapped in; then admitted, then
    each span's progress), then the KV commands, in this order (swap-ins copy once
    the commands' maps are applied, before the forward pass)."""

    spans: list[ScheduledSpan]
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Admission] = field(default_factory=list)
    kv_commands: list[KVCommand] = field(default_factory=list)  # needed by this step
    ahead_commands: list[KVCommand] = field(default_factory=list)  # for later steps
    swapped_out: list[SwapPlan] = field(default_factory=list)  # copy before kv_commands
    swapped_in: list[SwapPlan] = field(default_factory=list)  # copy before the forward
    unswapped: list[Request] = field(default_factory=list)  # swapped, now to recompute
    # Prefix-cache spill (engine/spill.py): copy each block out before the command that
    # drops its chunks; copy each restored block in before the forward pass.
    spills: list[SpillOut] = field(default_factory=list)
    restores: list[tuple[int, HostExtent]] = field(default_factory=list)  # (slot, extent)

    @property
    def is_decode(self) -> bool:
        return bool(self.spans) and all(sp.num_tokens == 1 for sp in self.spans)

    @property
    def num_tokens(self) -> int:
        return sum(sp.num_tokens for sp in self.spans)
