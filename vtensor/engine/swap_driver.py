"""SwapDriver: the engine's side of the host KV tier (one per engine; None: swap off).

It holds the two halves built by ``swap_setup.py``: the planner (the scheduler's
side: decisions and the tier's torch-free books, ``swap_plan.py``) and the
swapper (the pinned memory and the copies, ``swap.py``). It runs a step's
copies where the arena needs them, after ``LLMEngine._launch`` has moved the
requests (the engine alone calls a request's transitions):

* swap-outs at once, before the step's KV commands reach the arena: those
  commands unmap the chunks the copy reads, so ``copy_out`` returns only once
  they are on the host (``KVSwapper.copy_out``), and then the tier marks them
  resident;
* swap-ins in the executor's ``before_forward`` hook (``copy_in_hook``): after
  it applied the step's maps and waited for them. A request swapped in does not
  compute in that step (``SwappedQueue.resume``), so the step's forward pass, queued
  next, does not read the chunks, and the compute stream waits for the copy only
  after it (``wait_deferred``, before the step's launch event): the copy overlaps
  the forward pass, and the next step, the first to read the chunks, follows it.

With ``swap_space_bytes`` 0 the engine holds no driver and none of this runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtensor.kvcache.host_tier import HostTierUsage

from .swap import KVSwapper, SwapStats
from .swap_plan import SwapPlan, SwapPlanner


@dataclass(frozen=True)
class SwapDriver:
    planner: SwapPlanner
    swapper: KVSwapper

    def copy_out(self, plans: list[SwapPlan]) -> None:
        """Copy swapped-out requests' private chunks to the host tier (done on return:
        the caller may then apply the unmaps)."""
        for p in plans:
            self.swapper.copy_out(p.slot, p.extent)
            self.planner.tier.end_out(p.req.rid)

    def copy_in_hook(self, plans: list[SwapPlan]) -> Callable[[], None] | None:
        """What the executor runs once the step's chunks are mapped (None: no swap-in)."""
        return (lambda: self.copy_in(plans)) if plans else None

    def copy_in(self, plans: list[SwapPlan]) -> None:
        """Queue the copy-ins into the freshly mapped chunks, deferred (the compute
        stream waits from ``wait_deferred`` on); their host slots go back to the tier
        (reused only by a later copy on the same in-order copy stream)."""
        for p in plans:
            self.swapper.copy_in(p.slot, p.extent, defer=True)
            self.planner.tier.end_in(p.req.rid)

    def wait_deferred(self) -> int:
        """After the step's forward pass is queued: later work waits for its copy-ins."""
        return self.swapper.wait_deferred()

    def stats(self) -> tuple[SwapStats, HostTierUsage]:
        return self.swapper.stats(), self.planner.tier.usage()

    def close(self) -> None:
        """Free the pinned memory (the caller synchronized: no copy is in flight)."""
        self.swapper.close()
