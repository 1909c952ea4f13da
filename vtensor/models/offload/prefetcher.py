"""The prefetcher: offloaded layers stream through a ring of GPU slots, ahead of use.

The ``m`` offloaded layers, in forward order, are ``o_0 .. o_{m-1}``; ``o_k``'s
parameters are views of ring slot ``k mod depth`` *for good* (fixed addresses,
which CUDA graphs need). So a slot holds one of its layers at a time:

* after ``o_k`` has run, its slot is refilled with ``o_{k+depth}``, which has the
  compute of the ``depth - 1`` offloaded layers between (and of every resident
  layer between) to arrive behind;
* a slot's last layer of the pass refills it with its *first* layer of the next
  pass (``o_s`` for slot ``s``), so the next forward starts with its first
  ``depth`` layers in place (a slot with only one layer keeps it and is never
  copied to);
* ``o_k`` waits for its own fill before its kernels are queued (``k < depth``: the
  fill the previous pass queued for it, if that pass left it in flight).

Between passes the refills are left **in flight** (``end_forward`` does not join
the copy queue) when the pass ran eagerly: the last ``depth`` copies of a pass only
prepare the next one, so the step's tail (lm_head, the draw, the host reading the
token) and the next step's host preamble run while they cross the bus, instead of
the compute stream waiting for them at the end of every pass. Whatever runs on the
ring without calling ``before_layer`` must first call :meth:`settle` (a CUDA graph
replay or capture, another set of hooks): the compute queue then waits for every
fill queued so far. A captured pass joins at its end (a capture must rejoin the
copy stream), so after a graph replay nothing is in flight.

Invariant between passes: slot ``s`` holds ``o_s`` once the fills in flight
(``_carry``) are done. A pass that never ended (an exception) breaks it, and the
next ``begin_forward`` primes the ring again (outside a graph capture only).
With ``m <= depth`` every layer owns its slot and nothing is copied after the
first pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .hooks import LayerHooks
from .streams import CopyQueue


class LayerPrefetcher(LayerHooks):
    def __init__(
        self,
        order: Sequence[int],
        slots: Sequence[torch.Tensor],
        sources: Mapping[int, torch.Tensor],
        copies: CopyQueue,
    ) -> None:
        """``order``: the offloaded layers in forward order; ``slots``: the ring slots'
        bytes; ``sources[layer]``: the layer's packed host bytes."""
        if not order or not 1 <= len(slots) <= len(order):
            raise ValueError(f"{len(slots)} slots for {len(order)} offloaded layers")
        self.order = list(order)
        self.depth = len(slots)
        self.slots, self.sources, self.copies = list(slots), dict(sources), copies
        self.rank = {layer: k for k, layer in enumerate(self.order)}
        self.next_fill = [self._next(k) for k in range(len(self.order))]
        self.on_ready: Callable[[int], None] | None = None  # a test probe, after each wait
        self.wait_enabled = True  # tests turn it off to show a probe would catch staleness
        self._primed = False
        self._in_forward = False
        # Ranks (< depth) whose fill for the next pass is queued and not yet waited for.
        self._carry: set[int] = set()

    def _next(self, k: int) -> int | None:
        """The layer rank whose fill follows ``o_k``'s use of its slot (None: none)."""
        m, depth = len(self.order), self.depth
        if k + depth < m:
            return k + depth
        slot = k % depth
        if k == slot:  # the slot's only layer: it stays
            return None
        return slot  # the slot's last layer of the pass: its first one, for the next pass

    def prime(self) -> None:
        """Load each slot's first layer and wait (outside a graph capture)."""
        if self.copies.capturing():
            raise RuntimeError("the offload ring must be primed before a CUDA graph capture")
        for s in range(self.depth):
            self.copies.release(s)
            self._fill(s, s)
        self.copies.join()
        self._carry.clear()
        self._primed = True

    def invalidate(self) -> None:
        """Something else wrote the slots: prime again at the next forward."""
        self._primed = False

    def settle(self) -> None:
        """Make compute wait for every fill queued so far (no host wait on the GPU):
        before work that reads the ring without calling ``before_layer``."""
        if self._carry and self.copies.capturing():
            raise RuntimeError("settle the offload ring before a CUDA graph capture")
        self.copies.join()
        self._carry.clear()

    @property
    def in_flight(self) -> frozenset[int]:
        """Ranks whose fill for the next pass may still be crossing the bus."""
        return frozenset(self._carry)

    def begin_forward(self) -> None:
        if self._in_forward or not self._primed:
            self.prime()
        elif self._carry and self.copies.capturing():
            # A capture cannot wait on copies queued outside it: settle() first.
            raise RuntimeError("settle the offload ring before a CUDA graph capture")
        self._in_forward = True

    def before_layer(self, layer: int) -> None:
        k = self.rank.get(layer)
        if k is None:
            return
        if k >= self.depth or k in self._carry:
            self._carry.discard(k)
            if self.wait_enabled:
                self.copies.acquire(k)
        if self.on_ready is not None:
            self.on_ready(layer)

    def after_layer(self, layer: int) -> None:
        k = self.rank.get(layer)
        if k is None or (target := self.next_fill[k]) is None:
            return
        slot = k % self.depth
        self.copies.release(slot)
        self._fill(slot, target)

    def end_forward(self) -> None:
        if self.copies.capturing():
            self.copies.join()  # a capture must rejoin the copy stream before it ends
            self._carry.clear()
        else:  # the next pass's fills cross the bus behind this step's tail
            self._carry = {t for t in self.next_fill if t is not None and t < self.depth}
        self._in_forward = False

    def _fill(self, slot: int, target: int) -> None:
        src = self.sources[self.order[target]]
        self.copies.fill(slot, self.slots[slot][: src.numel()], src, target)


class SyncCopyHooks(LayerHooks):
    """The naive peer (accelerate's CPU offload): before each offloaded layer, copy its
    weights in and wait for the copy; no prefetch, no overlap. Benchmarks only."""

    def __init__(self, targets: Mapping[int, torch.Tensor], sources: Mapping[int, torch.Tensor]):
        self.targets, self.sources = dict(targets), dict(sources)

    def begin_forward(self) -> None:
        pass

    def before_layer(self, layer: int) -> None:
        src = self.sources.get(layer)
        if src is not None:
            self.targets[layer][: src.numel()].copy_(src)  # blocking: waits for the copy

    def after_layer(self, layer: int) -> None:
        pass

    def end_forward(self) -> None:
        pass
