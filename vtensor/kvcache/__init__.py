"""vtensor.kvcache: the KV layout, the torch-free slot manager, and the arena.

``manager`` is importable without torch (the scheduler and its tests rely on
that); ``layout`` and ``arena`` load torch, so they are imported lazily.
"""

from __future__ import annotations

from typing import Any

from .manager import KVCacheManager, KVGeometry, MapCommand, UnmapCommand

__all__ = ["KVArena", "KVCacheManager", "KVGeometry", "KVLayout", "MapCommand", "UnmapCommand"]


def __getattr__(name: str) -> Any:
    if name == "KVLayout":
        from .layout import KVLayout

        return KVLayout
    if name == "KVArena":
        from .arena import KVArena

        return KVArena
    raise AttributeError(f"module 'vtensor.kvcache' has no attribute {name!r}")
