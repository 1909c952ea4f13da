"""The weight placement's data: what the placement policy reads and returns. No torch.

The policy (``policy.py``) turns each layer's :class:`LayerWeights`, an
:class:`OffloadRequest` and a :class:`CopyCost` into a :class:`WeightPlacement`: one
:class:`LayerPlacement` a layer, the ring's depth and slot size, and the modelled
copy time per step. Words as in ``policy.py`` and docs/architecture.md's glossary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class LayerWeights:
    """A decoder layer's offloadable bytes per group (each tensor aligned as packed)."""

    layer: int
    groups: Mapping[str, int]


@dataclass(frozen=True)
class CopyCost:
    """The model of one host-to-device copy's time; it only ranks choices."""

    bandwidth: float = 25e9  # bytes/s, pinned host to device (PCIe 4 x16, conservatively)
    overhead_s: float = 20e-6  # per copy: launch, events, the compute wait

    def seconds(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / self.bandwidth if nbytes else 0.0


@dataclass(frozen=True)
class OffloadRequest:
    gpu_memory_budget: int | None = None
    cpu_offload_bytes: int = 0
    ring_depth: int = 2
    slot_granularity: int = 1  # a slot is a whole number of these (the VMM chunk)

    def __post_init__(self) -> None:
        if self.gpu_memory_budget is not None and self.cpu_offload_bytes:
            raise ValueError("give gpu_memory_budget or cpu_offload_gb, not both")
        if self.gpu_memory_budget is not None and self.gpu_memory_budget <= 0:
            raise ValueError(f"gpu_memory_budget must be positive, got {self.gpu_memory_budget}")
        if self.cpu_offload_bytes < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_bytes}")
        if self.ring_depth < 2:
            raise ValueError(f"the ring must be at least 2 layers deep, got {self.ring_depth}")
        if self.slot_granularity < 1:
            raise ValueError("slot_granularity must be >= 1")

    @property
    def active(self) -> bool:
        return self.gpu_memory_budget is not None or self.cpu_offload_bytes > 0


class BudgetTooSmallError(ValueError):
    """The budget cannot hold the fixed weights, the ring and the workspace."""

    def __init__(self, message: str, smallest_budget: int) -> None:
        super().__init__(message)
        self.smallest_budget = smallest_budget


@dataclass(frozen=True)
class LayerPlacement:
    layer: int
    offloaded: tuple[str, ...]  # groups in host memory, streamed through the ring
    offloaded_bytes: int
    resident_bytes: int
    slot: int | None  # ring slot of an offloaded layer (k mod depth, k its rank)


@dataclass(frozen=True)
class WeightPlacement:
    layers: tuple[LayerPlacement, ...]
    ring_depth: int  # 0 when nothing is offloaded
    slot_bytes: int
    fixed_bytes: int
    workspace_bytes: int
    step_copy_s: float  # modelled copy time per forward
    request: OffloadRequest

    @property
    def order(self) -> list[int]:
        """The offloaded layers, in the order a forward pass uses them."""
        return [p.layer for p in self.layers if p.offloaded]

    @property
    def offloaded_bytes(self) -> int:
        return sum(p.offloaded_bytes for p in self.layers)

    @property
    def resident_layer_bytes(self) -> int:
        return sum(p.resident_bytes for p in self.layers)

    @property
    def ring_bytes(self) -> int:
        return self.ring_depth * self.slot_bytes

    @property
    def weights_gpu_bytes(self) -> int:
        """Weight memory on the GPU: fixed + resident units + the ring."""
        return self.fixed_bytes + self.resident_layer_bytes + self.ring_bytes

    @property
    def gpu_bytes(self) -> int:
        """What the budget bounds: the weights' GPU memory and the workspace."""
        return self.weights_gpu_bytes + self.workspace_bytes

    def layer_map(self) -> str:
        """One character a layer: ``.`` resident, ``F`` every group offloaded, else the
        offloaded group's initial (``M``: mlp, ``A``: attn), ``+`` for several."""
        out = []
        for p in self.layers:
            if not p.offloaded:
                out.append(".")
            elif p.resident_bytes == 0:
                out.append("F")
            else:
                out.append(p.offloaded[0][0].upper() if len(p.offloaded) == 1 else "+")
        return "".join(out)

    def describe(self) -> str:
        if not self.order:
            return f"offload: none needed, every weight on the GPU ({gib(self.gpu_bytes)})"
        r = self.request
        asked = (
            f"gpu_memory_budget {gib(r.gpu_memory_budget)}"
            if r.gpu_memory_budget is not None
            else f"cpu_offload_gb {r.cpu_offload_bytes / GiB:.2f}"
        )
        groups = sorted({g for p in self.layers for g in p.offloaded})
        counts = ", ".join(f"{g} x{sum(g in p.offloaded for p in self.layers)}" for g in groups)
        return (
            f"offload ({asked}): GPU holds fixed {gib(self.fixed_bytes)} + resident "
            f"{gib(self.resident_layer_bytes)} + ring {self.ring_depth} x "
            f"{self.slot_bytes / 2**20:.1f} MiB + workspace {gib(self.workspace_bytes)} = "
            f"{gib(self.gpu_bytes)}; host holds {gib(self.offloaded_bytes)} ({counts}) in "
            f"{len(self.order)} of {len(self.layers)} layers; modelled copy "
            f"{self.step_copy_s * 1e3:.1f} ms/step; layers [{self.layer_map()}]"
        )


def gib(nbytes: int | None) -> str:
    n = nbytes or 0
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"
