"""OffloadedWeights: an offloaded model's host copies, GPU ring and prefetcher.

Building an offloaded model never holds the whole model on the GPU:

1. ``materialize`` gives the meta model memory: each offloaded tensor a view of
   its layer's packed host buffer (pinned on CUDA), every other tensor an empty
   device tensor; the ring is mapped;
2. the caller fills the weights (``load_checkpoint`` reads into the host views,
   ``init_random`` draws each offloaded tensor on the device and copies it out);
3. ``bind`` points every offloaded parameter at its ring slot, puts the
   prefetcher on the model (``model.offload``) and primes the ring.

``close`` frees the ring (and closes its backend) and the host memory; the
model must not run after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vtensor.memory import HostBuffer, PhysicalBackend, PinnedHostMemory

from ..llama import LlamaForCausalLM
from .hooks import LayerHooks
from .inventory import LayerPack, pack, view
from .policy import WeightPlacement
from .prefetcher import LayerPrefetcher, SyncCopyHooks
from .ring import WeightRing
from .streams import CopyFn, CopyQueue, CudaCopyQueue, ThreadCopyQueue


@dataclass(frozen=True)
class OffloadStats:
    offloaded_bytes: int  # weights in host memory
    ring_bytes: int
    host_live_bytes: int
    pinned: bool
    fills: int  # layer copies queued so far


class OffloadedWeights:
    def __init__(
        self,
        placement: WeightPlacement,
        packs: dict[int, LayerPack],
        host: PinnedHostMemory,
        buffers: dict[int, HostBuffer],
        ring: WeightRing,
    ) -> None:
        self.placement, self.packs, self.host = placement, packs, host
        self.buffers, self.ring = buffers, ring
        self.copies: CopyQueue | None = None
        self.prefetcher: LayerPrefetcher | None = None
        self._closed = False

    @classmethod
    def materialize(
        cls,
        model: LlamaForCausalLM,
        placement: WeightPlacement,
        device: torch.device,
        backend: PhysicalBackend,
    ) -> OffloadedWeights:
        """Give the meta ``model`` memory under ``placement`` (weights left unset)."""
        host = PinnedHostMemory(pin=device.type == "cuda")
        try:
            packs = {p.layer: pack(model, p) for p in placement.layers if p.offloaded}
            buffers = {layer: host.alloc(pk.nbytes) for layer, pk in packs.items()}
            hosted = {
                t.name: view(buffers[layer].tensor, t)
                for layer, pk in packs.items()
                for t in pk.tensors
            }
            _materialize(model, hosted, device)
            ring = WeightRing(backend, placement.ring_depth, placement.slot_bytes)
        except BaseException:
            host.close()
            raise
        return cls(placement, packs, host, buffers, ring)  # owns the backend from here on

    def bind(self, model: LlamaForCausalLM, copy_fn: CopyFn | None = None) -> None:
        """Offloaded parameters become ring views; install the prefetcher; prime the ring."""
        for layer, pk in self.packs.items():
            slot = self.ring.slot(self._slot(layer))
            for t in pk.tensors:
                _set_param(model, t.name, view(slot, t))
        device, depth = self.ring.backend.device, self.placement.ring_depth
        if device.type == "cuda":
            self.copies = CudaCopyQueue(device, depth, copy_fn)
        else:
            self.copies = ThreadCopyQueue(copy_fn)
        sources = {layer: buf.tensor for layer, buf in self.buffers.items()}
        slots = [self.ring.slot(s) for s in range(depth)]
        self.prefetcher = LayerPrefetcher(self.placement.order, slots, sources, self.copies)
        self.prefetcher.prime()
        model.offload = self.prefetcher

    def sync_hooks(self, pageable: bool) -> SyncCopyHooks:
        """The naive peer's hooks over the same ring; ``pageable`` copies the host weights
        to ordinary memory first, as accelerate keeps them (twice the host memory)."""
        targets = {layer: self.ring.slot(self._slot(layer)) for layer in self.packs}
        sources = {
            layer: buf.tensor.clone() if pageable else buf.tensor
            for layer, buf in self.buffers.items()
        }
        return SyncCopyHooks(targets, sources)

    @contextmanager
    def using(self, model: LlamaForCausalLM, hooks: LayerHooks) -> Iterator[None]:
        """Run ``model`` with other hooks (benchmarks' peers, eager only); the prefetcher
        comes back after and primes the ring again at once (the peer rewrote its slots,
        and a CUDA graph replay, which calls no hook, may come next)."""
        assert self.prefetcher is not None, "bind() first"
        self.prefetcher.settle()  # the peer writes the slots: after the fills in flight
        model.offload = hooks
        try:
            yield
        finally:
            model.offload = self.prefetcher
            self.prefetcher.prime()

    def stats(self) -> OffloadStats:
        host = self.host.stats()
        fills = self.copies.fills if self.copies is not None else 0
        return OffloadStats(
            self.placement.offloaded_bytes, self.ring.nbytes, host.live_bytes, host.pinned, fills
        )

    def problems(self) -> list[str]:
        """Broken invariants of the ring's pool and the host memory's books."""
        host = self.host.stats()
        want = 0 if self._closed else sum(b.nbytes for b in self.buffers.values())
        out = [] if self._closed else self.ring.problems()
        if not host.balanced or host.live_bytes != want:
            out.append(f"host memory holds {host.live_bytes} bytes, expected {want}: {host}")
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the ring and the host copies (idempotent); no copy may be in flight."""
        if self._closed:
            return
        self._closed = True
        if self.copies is not None:
            self.copies.close()
        self.ring.close()
        self.ring.backend.close()
        self.host.close()

    def _slot(self, layer: int) -> int:
        slot = self.placement.layers[layer].slot
        assert slot is not None, f"layer {layer} is not offloaded"
        return slot


def _materialize(
    model: LlamaForCausalLM, hosted: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Each meta parameter becomes ``hosted[name]`` or an empty tensor on ``device``
    (a tied parameter stays one); meta buffers become empty device tensors."""
    made: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                data = hosted.get(f"{prefix}.{name}" if prefix else name)
                if data is None:
                    data = torch.empty(p.shape, dtype=p.dtype, device=device)
                made[id(p)] = nn.Parameter(data, requires_grad=False)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    model.model.rotary.reset_tables()
    model.eval().requires_grad_(False)


def _set_param(model: nn.Module, name: str, data: torch.Tensor) -> None:
    module_name, _, param = name.rpartition(".")
    model.get_submodule(module_name)._parameters[param] = nn.Parameter(data, requires_grad=False)
