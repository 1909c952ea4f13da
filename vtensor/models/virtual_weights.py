"""VirtualWeights: a model whose parameters are views of one ``WeightRegion``.

Building one never holds the weights twice: the model is made on the meta
device, each parameter then becomes a view at its offset in the region (tied
parameters stay one), and the caller fills the weights in place
(``load_checkpoint`` / ``init_random``). Buffers (RoPE's tables: derived, not
weights) stay ordinary device tensors and are kept while asleep.

Sleep (``engine/sleep.py`` drives it) releases the region's chunks; wake maps
fresh ones at the same addresses, so the parameters' data pointers never
change (``data_ptrs`` lets tests check it) and CUDA graphs captured over them
replay with no recapture. Between the two, nothing may read a parameter: on
the host backend the range is ``PROT_NONE`` (a read faults), on CUDA unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtensor.memory import PhysicalBackend, PinnedHostMemory
from vtensor.memory.weight_region import RegionState, RegionStats, WeightRegion

from .llama import LlamaForCausalLM
from .offload.weights import _materialize

ALIGN = 256  # bytes: every parameter starts on a boundary any kernel's vector loads accept


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the region."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def layout(model: LlamaForCausalLM) -> tuple[list[ParamSlot], int]:
    """Each distinct parameter's slot, in ``named_parameters`` order (tied ones once),
    and the bytes they need."""
    slots: list[ParamSlot] = []
    offset = 0
    for name, p in model.named_parameters():  # remove_duplicate: a tied weight once
        slots.append(ParamSlot(name, offset, tuple(p.shape), p.dtype))
        offset += -(-slots[-1].nbytes // ALIGN) * ALIGN
    return slots, offset


class VirtualWeights:
    def __init__(self, region: WeightRegion, slots: list[ParamSlot]) -> None:
        self.region, self.slots = region, slots

    @classmethod
    def materialize(
        cls,
        model: LlamaForCausalLM,
        device: torch.device,
        backend: PhysicalBackend,
        keep_host_buffer: bool = True,
    ) -> VirtualWeights:
        """Give the meta ``model`` its memory: parameters in a new region on ``backend``
        (which the region owns from here on), buffers on ``device``. Weights unset.
        ``keep_host_buffer``: see ``WeightRegion``."""
        slots, total = layout(model)
        host = PinnedHostMemory(pin=device.type == "cuda")
        try:
            region = WeightRegion(backend, total, host, keep_host_buffer)
        except BaseException:
            host.close()
            backend.close()
            raise
        weights = cls(region, slots)
        try:
            views = {s.name: region.view(s.dtype, s.shape, s.offset) for s in slots}
            _materialize(model, views, device)
        except BaseException:
            weights.close()
            raise
        return weights

    @property
    def resident(self) -> bool:
        return self.region.state is RegionState.RESIDENT

    @property
    def state(self) -> RegionState:
        return self.region.state

    def held_bytes(self) -> int:
        """Device memory the weights hold now (0 while asleep)."""
        return self.region.stats().mapped_bytes

    def stats(self) -> RegionStats:
        return self.region.stats()

    def offload(self) -> None:
        """Level 1: the bytes go to (pinned) host memory, the chunks to the driver."""
        self.region.offload()

    def discard(self) -> None:
        """Level 2: the chunks go to the driver; the bytes are lost (reload them)."""
        self.region.discard()

    def restore(self) -> None:
        """Fresh chunks at the same addresses (an offloaded region's bytes come back)."""
        self.region.restore()

    def data_ptrs(self, model: LlamaForCausalLM) -> dict[str, int]:
        return {n: p.data_ptr() for n, p in model.named_parameters()}

    def problems(self) -> list[str]:
        return self.region.problems()

    def close(self) -> None:
        """Release the region and its backend, and the host copy (idempotent)."""
        if self.region.vt.closed:
            return
        self.region.close()
        self.region.host.close()
        self.region.backend.close()
