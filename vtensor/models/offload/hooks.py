"""The model's side of weight offload: four calls around its decoder layers."""

from __future__ import annotations

from abc import ABC, abstractmethod


class LayerHooks(ABC):
    """Called by ``LlamaForCausalLM.forward`` around its decoder layers.

    Contract: ``begin_forward``, then for each layer ``i`` in order
    ``before_layer(i)``, the layer's kernels, ``after_layer(i)``; then
    ``end_forward``. The hooks queue stream work only (no host sync on the GPU),
    so a forward pass with them can be captured in a CUDA graph; when a layer's
    kernels are queued after ``before_layer(i)``, every weight they read is in
    place. Copies may still be in flight after ``end_forward`` (for the next pass);
    work that reads the weights without calling the hooks (a CUDA graph replay or
    capture, other hooks) calls ``settle`` first.
    """

    @abstractmethod
    def begin_forward(self) -> None: ...

    @abstractmethod
    def before_layer(self, layer: int) -> None: ...

    @abstractmethod
    def after_layer(self, layer: int) -> None: ...

    @abstractmethod
    def end_forward(self) -> None: ...

    def settle(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Queue a wait for every copy in flight ahead of the compute queued next."""
