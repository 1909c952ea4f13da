"""The prefetcher's ordering on the CPU: a real copy thread fills the ring while the
calling thread "computes" (reads each layer's slot). Every read must see that layer's
own bytes; a deliberately slowed copy must delay the read, never let it see stale
bytes; and with the wait taken out, the same probe does see stale bytes (so the
probe can fail)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest
import torch

from vtensor.memory import PinnedHostMemory, open_backend
from vtensor.models.offload.prefetcher import LayerPrefetcher
from vtensor.models.offload.ring import WeightRing
from vtensor.models.offload.streams import CopyFn, OffloadCopyError, ThreadCopyQueue

CHUNK = 4096


class Layers:
    """``len(sizes)`` layers; those in ``offloaded`` stream through a ring of ``depth``."""

    def __init__(
        self, sizes: list[int], offloaded: list[int], depth: int, copy_fn: CopyFn | None = None
    ) -> None:
        self.sizes, self.offloaded = sizes, offloaded
        self.backend = open_backend("host", chunk_size=CHUNK)
        slot = -(-max(sizes[i] for i in offloaded) // CHUNK) * CHUNK
        self.ring = WeightRing(self.backend, min(depth, len(offloaded)), slot)
        self.host = PinnedHostMemory(pin=False)
        self.bufs = {i: self.host.alloc(sizes[i]) for i in offloaded}
        for b in self.bufs.values():  # every layer's bytes differ from every other's
            b.tensor.copy_(torch.randint(0, 256, (b.nbytes,), dtype=torch.uint8))
        self.copies = ThreadCopyQueue(copy_fn)
        slots = [self.ring.slot(s) for s in range(self.ring.depth)]
        sources = {i: b.tensor for i, b in self.bufs.items()}
        self.pf = LayerPrefetcher(offloaded, slots, sources, self.copies)
        self.log: list[tuple[str, int]] = []  # ("compute", layer) as each layer reads

    def view(self, layer: int) -> torch.Tensor:
        k = self.offloaded.index(layer)
        return self.ring.slot(k % self.ring.depth)[: self.sizes[layer]]

    def forward(self, fail_at: int | None = None) -> list[int]:
        """One pass; the offloaded layers whose slot did not hold their bytes."""
        stale = []
        self.pf.begin_forward()
        for layer in range(len(self.sizes)):
            self.pf.before_layer(layer)
            if layer == fail_at:
                raise RuntimeError("a kernel failed")
            if layer in self.bufs:
                self.log.append(("compute", layer))
                if not torch.equal(self.view(layer), self.bufs[layer].tensor):
                    stale.append(layer)
            self.pf.after_layer(layer)
        self.pf.end_forward()
        return stale

    def close(self) -> None:
        self.copies.close()
        self.ring.close()
        self.backend.close()
        self.host.close()
        assert self.host.stats().live_bytes == 0 and self.ring.pool.closed


def sleepy(delay_s: Callable[[], float]) -> CopyFn:
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        time.sleep(delay_s())
        dst.copy_(src)

    return copy


CASES = [  # (layers, offloaded, depth)
    (8, [0, 1, 2, 3, 4, 5, 6, 7], 2),  # every layer, m a multiple of the depth
    (7, [0, 1, 2, 3, 4, 5, 6], 2),  # m odd: a slot's last layer refills it right away
    (10, [1, 2, 4, 5, 7, 8], 3),  # balanced: resident layers between
    (6, [2, 5], 2),  # every offloaded layer owns its slot: nothing to copy
    (5, [3], 2),  # one offloaded layer (ring depth 1)
    (9, [0, 2, 3, 4, 6, 8], 4),
]


@pytest.mark.parametrize(("n", "offloaded", "depth"), CASES)
def test_every_layer_reads_its_own_weights_under_random_copy_delays(
    n: int, offloaded: list[int], depth: int
) -> None:
    rng = random.Random()
    sizes = [rng.randint(1, 3 * CHUNK) for _ in range(n)]
    layers = Layers(sizes, offloaded, depth, sleepy(lambda: rng.uniform(0, 0.003)))
    try:
        for _ in range(4):
            assert layers.forward() == []
        m, d = len(offloaded), layers.ring.depth
        # The first pass primes each slot; then every pass fills each layer once, except
        # a slot's only layer, which stays.
        users = [len(range(s, m, d)) for s in range(d)]
        assert layers.copies.fills == d + 4 * sum(u for u in users if u > 1)
    finally:
        layers.close()


def test_a_slow_copy_delays_compute_and_is_never_read_stale() -> None:
    """The copy of layer 5 takes 80 ms: layer 5's read waits for it, and every read in
    every pass comes after the copy that filled its slot (layers 0 and 1: the refill
    queued by the previous pass, which that pass left in flight)."""
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    sizes = [2 * CHUNK + 7 * i for i in range(8)]
    layers: Layers | None = None

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        assert layers is not None
        layer = next(i for i, b in layers.bufs.items() if b.tensor.data_ptr() == src.data_ptr())
        time.sleep(0.08 if layer == 5 else 0.0)
        dst.copy_(src)
        with lock:
            log.append(("copied", layer))

    layers = Layers(sizes, list(range(8)), 2, copy)
    try:
        layers.forward()  # the first pass after priming
        layers.pf.on_ready = lambda layer: log.append(("compute", layer))
        for _ in range(3):
            t0 = time.perf_counter()
            assert layers.forward() == []
            assert time.perf_counter() - t0 >= 0.08  # compute waited for the slow copy
        layers.pf.settle()
        with lock:
            events = list(log)
        computes = [i for i, (what, _) in enumerate(events) if what == "compute"]
        assert len(computes) == 3 * 8
        for n, i in enumerate(computes):
            layer = events[i][1]
            # Its fill: queued after the previous occupant of its slot was read.
            prev = computes[n - 2] if n >= 2 else -1
            assert ("copied", layer) in events[prev + 1 : i], (n, events)
    finally:
        layers.close()


def test_a_pass_ends_with_the_next_pass_fills_in_flight() -> None:
    """The pass does not wait for its last copies (they only prepare the next pass):
    with layer 0's refill slowed to 150 ms, ``forward`` returns before it lands, the
    next pass's read of layer 0 waits for it, and ``settle`` waits for it too."""
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    sizes = [3 * CHUNK] * 8
    layers: Layers | None = None
    slow = threading.Event()

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        assert layers is not None
        layer = next(i for i, b in layers.bufs.items() if b.tensor.data_ptr() == src.data_ptr())
        if layer == 0 and slow.is_set():
            time.sleep(0.15)
        dst.copy_(src)
        with lock:
            log.append(("copied", layer))

    layers = Layers(sizes, list(range(8)), 2, copy)
    try:
        assert layers.forward() == []
        layers.pf.settle()
        slow.set()
        log.clear()
        assert layers.forward() == []
        with lock:
            assert ("copied", 0) not in log  # the pass ended with layer 0's refill queued
        assert layers.pf.in_flight == {0, 1}
        layers.pf.on_ready = lambda layer: log.append(("compute", layer))
        assert layers.forward() == []  # layer 0 read only after its refill landed
        with lock:
            assert log.index(("copied", 0)) < log.index(("compute", 0)), log
        log.clear()
        layers.pf.settle()
        with lock:
            assert ("copied", 0) in log and layers.pf.in_flight == frozenset()
    finally:
        layers.close()


class CapturingQueue(ThreadCopyQueue):
    """A CPU copy queue that claims to be inside a CUDA graph capture when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.capture = False
        self.joins = 0

    def capturing(self) -> bool:
        return self.capture

    def join(self) -> None:
        self.joins += 1
        super().join()


def test_a_capture_needs_a_settled_ring_and_joins_at_its_end() -> None:
    layers = Layers([CHUNK] * 6, list(range(6)), 2)
    queue = CapturingQueue()
    layers.copies.close()
    layers.copies = queue
    layers.pf.copies = queue
    try:
        assert layers.forward() == []  # primes, then leaves the refills in flight
        assert layers.pf.in_flight == {0, 1}
        queue.capture = True
        with pytest.raises(RuntimeError, match="settle the offload ring"):
            layers.forward()
        with pytest.raises(RuntimeError, match="settle the offload ring"):
            layers.pf.settle()
        queue.capture = False
        layers.forward()  # outside a capture the pass waits for the fills in flight
        layers.pf.settle()
        queue.capture = True
        joins = queue.joins
        assert layers.forward() == []  # a "captured" pass: it rejoins the copies at its end
        assert queue.joins == joins + 1 and layers.pf.in_flight == frozenset()
    finally:
        layers.close()


def test_without_the_wait_the_probe_sees_stale_weights() -> None:
    """The negative control: the same probe, with compute no longer waiting for its
    fill, catches layers that read their slot's previous layer."""
    sizes = [3 * CHUNK] * 8
    layers = Layers(sizes, list(range(8)), 2, sleepy(lambda: 0.01))
    try:
        layers.forward()
        layers.pf.wait_enabled = False
        stale = layers.forward()
        assert len(stale) >= 3, stale
        layers.pf.wait_enabled = True
    finally:
        layers.close()


def test_a_pass_that_fails_midway_is_followed_by_a_primed_ring() -> None:
    layers = Layers([CHUNK] * 6, list(range(6)), 2, sleepy(lambda: 0.001))
    try:
        assert layers.forward() == []
        with pytest.raises(RuntimeError, match="kernel failed"):
            layers.forward(fail_at=3)
        for _ in range(2):  # the slots hold layers 2..5's leftovers: primed again first
            assert layers.forward() == []
    finally:
        layers.close()


def test_a_failed_copy_fails_the_forward_instead_of_hanging() -> None:
    calls = []

    def flaky(dst: torch.Tensor, src: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise OSError("the bus fell over")
        dst.copy_(src)

    layers = Layers([CHUNK] * 6, list(range(6)), 2, flaky)
    try:
        with pytest.raises(OffloadCopyError, match="bus fell over"):
            layers.forward()
    finally:
        layers.close()


def test_the_prefetcher_refuses_more_slots_than_layers() -> None:
    copies = ThreadCopyQueue()
    with pytest.raises(ValueError, match="3 slots for 2"):
        LayerPrefetcher([0, 1], [torch.empty(1)] * 3, {}, copies)
    copies.close()
