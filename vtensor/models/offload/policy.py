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
feasible one with the least modelled copy time per step. The placement's data
(``LayerWeights``, ``OffloadRequest``, ``WeightPlacement``, ...) is in
``placement.py``, re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .placement import (
    BudgetTooSmallError,
    CopyCost,
    GiB,
    LayerPlacement,
    LayerWeights,
    OffloadRequest,
    WeightPlacement,
    gib,
)

# The placement's data lives in ``placement.py``; its names stay importable from here.
__all__ = [
    "BudgetTooSmallError",
    "CopyCost",
    "GiB",
    "LayerPlacement",
    "LayerWeights",
    "OffloadRequest",
    "WeightPlacement",
    "balanced_offloaded",
    "plan_placement",
    "rank_groups",
]


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
            f"({gib(ring)}); embedding, lm_head and norms stay on the GPU"
        )
    return BudgetTooSmallError(
        f"gpu_memory_budget {request.gpu_memory_budget} bytes "
        f"({gib(request.gpu_memory_budget)}) cannot hold the fixed weights ({gib(fixed_bytes)}: "
        f"embedding, lm_head, norms), a {request.ring_depth}-layer ring ({gib(ring)}) and the "
        f"step's workspace ({gib(workspace_bytes)}); the smallest budget that works is "
        f"{smallest} bytes ({gib(smallest)})",
        smallest,
    )


def _round_up(nbytes: int, request: OffloadRequest) -> int:
    g = request.slot_granularity
    return -(-nbytes // g) * g
