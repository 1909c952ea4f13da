"""Peer kernels for side-by-side benchmarks, loaded only if present.

SGLang's Triton attention kernels come from the ``sglang==0.5.5`` wheel (pure
Python); only its ``triton_ops`` files are needed, with a stub
``sglang.srt.utils``. Nothing of it is vendored in this repository.
"""

from __future__ import annotations

from types import ModuleType


def load_sglang() -> tuple[ModuleType, ModuleType] | None:
    """(decode module, extend module), or None when sglang is not importable."""
    try:
        from sglang.srt.layers.attention.triton_ops import decode_attention, extend_attention
    except Exception:
        return None
    return decode_attention, extend_attention
