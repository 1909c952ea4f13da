"""What of a Llama model can be offloaded, and how a layer's offloaded tensors pack.

Each decoder layer has two groups (``policy.py``): ``attn`` (the fused q/k/v
projection, its bias if any, and o) and ``mlp`` (fused gate/up, and down).
Everything else is *fixed*: the embedding, lm_head and every norm stay on the
GPU. A layer's offloaded tensors are packed into one buffer, each at a
``ALIGN``-byte offset, in the same layout in host memory and in its ring slot,
so one copy moves a whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .policy import LayerPlacement, LayerWeights

# Bytes: every packed tensor starts at a multiple (cuBLAS and Triton want >= 16; 512 is
# what torch's caching allocator gives resident tensors, so kernels see alike pointers).
ALIGN = 512
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "self_attn.o_proj.weight"),
    "mlp": ("mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
}


@dataclass(frozen=True)
class PackedTensor:
    name: str  # the parameter's full name in the model
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes into the layer's buffer

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class LayerPack:
    """A layer's offloaded tensors, packed; ``nbytes`` is what one copy moves."""

    layer: int
    tensors: tuple[PackedTensor, ...]
    nbytes: int


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def group_params(model: nn.Module, layer: int) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group name -> ``(full name, parameter)`` of the layer's tensors that exist."""
    params = dict(model.named_parameters())
    prefix = layer_prefix(layer)
    return {
        group: [(prefix + n, params[prefix + n]) for n in names if prefix + n in params]
        for group, names in GROUPS.items()
    }


def inventory(model: nn.Module, num_layers: int) -> tuple[list[LayerWeights], int]:
    """Each layer's offloadable bytes per group (aligned as packed), and the fixed
    bytes (every other parameter, a tied one once)."""
    layers: list[LayerWeights] = []
    grouped: set[str] = set()
    for layer in range(num_layers):
        groups = group_params(model, layer)
        sizes = {g: sum(_aligned(p) for _, p in ps) for g, ps in groups.items() if ps}
        layers.append(LayerWeights(layer, sizes))
        grouped.update(n for ps in groups.values() for n, _ in ps)
    fixed = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n not in grouped
    )
    return layers, fixed


def pack(model: nn.Module, placed: LayerPlacement) -> LayerPack:
    """The packed layout of the layer's offloaded groups, in group order."""
    groups = group_params(model, placed.layer)
    tensors, offset = [], 0
    for group in placed.offloaded:
        for name, p in groups[group]:
            tensors.append(PackedTensor(name, p.dtype, tuple(p.shape), offset))
            offset += _aligned(p)
    if offset != placed.offloaded_bytes:
        raise RuntimeError(f"layer {placed.layer}: packs {offset} bytes, planned for "
                           f"{placed.offloaded_bytes}")  # fmt: skip
    return LayerPack(placed.layer, tuple(tensors), offset)


def view(buffer: torch.Tensor, t: PackedTensor) -> torch.Tensor:
    """The packed tensor ``t`` as a typed view of a layer's byte buffer (host or slot)."""
    return buffer[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)


def _aligned(p: torch.Tensor) -> int:
    return -(-p.numel() * p.element_size() // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
