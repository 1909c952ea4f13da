"""vtensor.kvcache: the KV layout over virtual tensors (slot manager: planned)."""

from .layout import KVLayout

__all__ = ["KVLayout"]
