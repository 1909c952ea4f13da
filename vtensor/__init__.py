"""vtensor: an LLM serving engine whose KV memory is built on virtual tensors.

``from vtensor import LLM, SamplingParams`` loads the engine lazily, so that
``vtensor.memory`` stays importable without the model stack.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams", "SharedKVPool"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from vtensor.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from vtensor.engine.params import SamplingParams

        return SamplingParams
    if name == "SharedKVPool":
        from vtensor.engine.shared_pool import SharedKVPool

        return SharedKVPool
    if name == "EngineConfig":
        from vtensor.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'vtensor' has no attribute {name!r}")
