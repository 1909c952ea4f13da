"""The switch of the kernels that stand in for torch ops outright: SiLU·mul
(``activation.py``, used by ``models/fused.py``) and the greedy argmax
(``argmax.py``, used by ``engine/sampler.py``).

``VTENSOR_SILU_ARGMAX=0`` in the environment (read once, at import; tensor
parallel workers inherit it) turns both off, for A/B benchmarks: SiLU·mul is
then ``torch.compile``'s kernel again and the argmax torch's. In process,
:func:`set_silu_argmax_enabled`. The GEMV has its own (``VTENSOR_GEMV``).
"""

from __future__ import annotations

import os

_enabled = os.environ.get("VTENSOR_SILU_ARGMAX", "1") != "0"


def set_silu_argmax_enabled(enabled: bool) -> None:
    """Use the kernels (on CUDA) or not, for calls from now on (a CUDA graph keeps the
    kernels it captured)."""
    global _enabled
    _enabled = enabled


def silu_argmax_enabled() -> bool:
    return _enabled
