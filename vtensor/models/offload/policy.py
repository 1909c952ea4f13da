"""The placement policy: which of each layer's tensor groups stay on the GPU. No torch.

Words (docs/architecture.md's glossary):

* a **group** is a set of one layer's tensors that move together (``attn``: the
  q/k/v and o projections; ``mlp``: gate/up and down); a **unit** is one group
  of one layer, what the policy offloads;
* **fixed weights** are never offloaded (embedding, lm_head, norms: small, or
  read in full by every step);
* the **workspace** is the step's activations; the **ring** is ``depth`` slots
  of ``slot_bytes`` on the GPU that offloaded units stream through.

``gpu_memory_budget`` bounds fixed + resident + ring + workspace;
``cpu_offload_bytes`` (vLLM's ``--cpu-offload-gb``) is the GPU memory the
offload must save, net of the ring it needs. Two rules pick the units:

* **tensor preservation**: a resident tensor saves its copy every step and costs
  its bytes of GPU memory. With a copy costing ``overhead + bytes / bandwidth``,
  small tensors save the most copy time per GPU byte, so groups are offloaded in
  order of that value, lowest first: the MLP before the attention projections.
* **balanced locking**: the layers that keep a group resident are spaced evenly
  (gaps differ by at most one layer), not the first N, so every prefetch has the
  compute of resident layers to hide behind.

Each candidate (offload the top ``t`` groups one group at a time, or ``t``
groups as one unit per layer) is sized for its own ring; the policy keeps the
feasible one with the least modelled copy time per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
            return f"offload: none needed, every weight on the GPU ({_gib(self.gpu_bytes)})"
        r = self.request
        asked = (
            f"gpu_memory_budget {_gib(r.gpu_memory_budget)}"
            if r.gpu_memory_budget is not None
            else f"cpu_offload_gb {r.cpu_offload_bytes / GiB:.2f}"
        )
        groups = sorted({g for p in self.layers for g in p.offloaded})
        counts = ", ".join(f"{g} x{sum(g in p.offloaded for p in self.layers)}" for g in groups)
        return (
            f"offload ({asked}): GPU holds fixed {_gib(self.fixed_bytes)} + resident "
            f"{_gib(self.resident_layer_bytes)} + ring {self.ring_depth} x "
            f"{self.slot_bytes / 2**20:.1f} MiB + workspace {_gib(self.workspace_bytes)} = "
            f"{_gib(self.gpu_bytes)}; host holds {_gib(self.offloaded_bytes)} ({counts}) in "
            f"{len(self.order)} of {len(self.layers)} layers; modelled copy "
            f"{self.step_copy_s * 1e3:.1f} ms/step; layers [{self.layer_map()}]"
        )


def plan_placement(
    layers: Sequence[LayerWeights],
    fixed_bytes: int,
    workspace_bytes: int,
    request: OffloadRequest,
    cost: CopyCost | None = None,
) -> WeightPlacement:
    """The placement for ``request``; everything resident when the budget allows it.

    Raises :class:`BudgetTooSmallError` (naming the smallest budget that works) or,
    for ``cpu_offload_bytes``, a ``ValueError`` naming the most that can be saved.
    """
    cost = cost or CopyCost()
    if [w.layer for w in layers] != list(range(len(layers))):
        raise ValueError("layers must be numbered 0..n-1 in order")
    total = sum(sum(w.groups.values()) for w in layers)
    save = request.cpu_offload_bytes
    if request.gpu_memory_budget is not None:
        save = fixed_bytes + workspace_bytes + total - request.gpu_memory_budget
    if not request.active or save <= 0:
        return _build(layers, {}, fixed_bytes, workspace_bytes, request, cost)
    ranked = rank_groups(layers, cost)
    plans = []
    for t in range(1, len(ranked) + 1):
        for whole in (False, True) if t > 1 else (False,):
            units = _choose(layers, ranked[:t], whole, save, request)
            if units is not None:
                plans.append(_build(layers, units, fixed_bytes, workspace_bytes, request, cost))
    if not plans:
        raise _too_small(layers, ranked, fixed_bytes, workspace_bytes, request)
    return min(plans, key=lambda p: (p.step_copy_s, p.gpu_bytes))


def rank_groups(layers: Sequence[LayerWeights], cost: CopyCost) -> list[str]:
    """Group names, the first to offload first: least copy time saved per resident byte."""
    names = sorted({g for w in layers for g in w.groups})

    def value(g: str) -> float:  # copy seconds a resident byte of ``g`` saves
        sizes = [w.groups.get(g, 0) for w in layers]
        nbytes = sum(sizes)
        return sum(cost.seconds(s) for s in sizes) / nbytes if nbytes else math.inf

    return sorted(names, key=lambda g: (value(g), g))


def balanced_offloaded(num_layers: int, count: int) -> list[int]:
    """``count`` layers to offload, the rest (resident) spaced evenly: resident layer
    ``i`` of ``k`` sits at ``floor((i + 1/2) · n / k)``, so consecutive resident layers
    are ``floor(n/k)`` or ``ceil(n/k)`` apart, around the model's end too."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"cannot offload {count} of {num_layers} layers")
    keep = num_layers - count
    resident = {(2 * i + 1) * num_layers // (2 * keep) for i in range(keep)}
    return [layer for layer in range(num_layers) if layer not in resident]


def _choose(
    layers: Sequence[LayerWeights],
    tier: list[str],
    whole: bool,
    save: int,
    request: OffloadRequest,
) -> dict[int, list[str]] | None:
    """Units that save ``save`` bytes net of a ring sized for ``tier``, or None."""
    slot = _round_up(max(sum(w.groups.get(g, 0) for g in tier) for w in layers), request)
    remaining = save + request.ring_depth * slot
    units: dict[int, list[str]] = {}
    for groups in [tier] if whole else [[g] for g in tier]:
        if remaining <= 0:
            break
        sizes = [sum(w.groups.get(g, 0) for g in groups) for w in layers]
        chosen = _fewest(sizes, remaining)
        for layer in chosen:
            units.setdefault(layer, []).extend(groups)
        remaining -= sum(sizes[layer] for layer in chosen)
    return units if remaining <= 0 else None


def _fewest(sizes: list[int], need: int) -> list[int]:
    """The fewest layers, balanced, whose sizes reach ``need`` (all if none do)."""
    start = max(1, math.ceil(need / max(max(sizes), 1)))
    for count in range(min(start, len(sizes)), len(sizes) + 1):
        chosen = balanced_offloaded(len(sizes), count)
        if sum(sizes[layer] for layer in chosen) >= need:
            return chosen
    return list(range(len(sizes)))


def _build(
    layers: Sequence[LayerWeights],
    units: Mapping[int, list[str]],
    fixed_bytes: int,
    workspace_bytes: int,
    request: OffloadRequest,
    cost: CopyCost,
) -> WeightPlacement:
    placed, k = [], 0
    order = sorted(units)
    depth = min(request.ring_depth, len(order))
    for w in layers:
        groups = tuple(g for g in w.groups if g in units.get(w.layer, ()))
        off = sum(w.groups[g] for g in groups)
        slot = k % depth if groups else None
        k += bool(groups)
        placed.append(LayerPlacement(w.layer, groups, off, sum(w.groups.values()) - off, slot))
    slot_bytes = _round_up(max((p.offloaded_bytes for p in placed), default=0), request)
    copy_s = sum(cost.seconds(p.offloaded_bytes) for p in placed)
    return WeightPlacement(
        tuple(placed), depth, slot_bytes if depth else 0, fixed_bytes, workspace_bytes, copy_s,
        request,
    )  # fmt: skip


def _too_small(
    layers: Sequence[LayerWeights],
    ranked: list[str],
    fixed_bytes: int,
    workspace_bytes: int,
    request: OffloadRequest,
) -> ValueError:
    """The error for a request no candidate meets, naming the smallest GPU footprint."""
    total = sum(sum(w.groups.values()) for w in layers)
    floors = [(total, 0)]  # nothing offloaded: a ring never saves more than it holds
    for t in range(1, len(ranked) + 1):  # every unit of the top t groups offloaded
        part = [sum(w.groups.get(g, 0) for g in ranked[:t]) for w in layers]
        ring = min(request.ring_depth, len(layers)) * _round_up(max(part), request)
        floors.append((total - sum(part) + ring, ring))
    resident, ring = min(floors)
    smallest = fixed_bytes + workspace_bytes + resident
    if request.gpu_memory_budget is None:
        most = max(0, total - resident)
        return ValueError(
            f"cpu_offload_gb {request.cpu_offload_bytes / GiB:.2f} cannot be met: offloading "
            f"every layer saves at most {most / GiB:.2f} GiB of GPU memory, net of the ring "
            f"({_gib(ring)}); embedding, lm_head and norms stay on the GPU"
        )
    return BudgetTooSmallError(
        f"gpu_memory_budget {request.gpu_memory_budget} bytes "
        f"({_gib(request.gpu_memory_budget)}) cannot hold the fixed weights ({_gib(fixed_bytes)}: "
        f"embedding, lm_head, norms), a {request.ring_depth}-layer ring ({_gib(ring)}) and the "
        f"step's workspace ({_gib(workspace_bytes)}); the smallest budget that works is "
        f"{smallest} bytes ({_gib(smallest)})",
        smallest,
    )


def _round_up(nbytes: int, request: OffloadRequest) -> int:
    g = request.slot_granularity
    return -(-nbytes // g) * g


def _gib(nbytes: int | None) -> str:
    n = nbytes or 0
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"
