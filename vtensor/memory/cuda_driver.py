"""The CUDA driver through ``cuda.bindings``: the module, and checked calls.

Every driver call returns ``(CUresult, *values)``; :func:`check` turns a failure
into a :class:`CudaDriverError` naming the call, so no result goes unchecked.
"""

from __future__ import annotations

from typing import Any

from .errors import CudaDriverError, NoCudaDriverError


def driver() -> Any:
    try:
        from cuda.bindings import driver as cu
    except ImportError as exc:  # pragma: no cover - cuda-bindings is a dependency
        raise NoCudaDriverError("cuda-bindings is not installed") from exc
    return cu


def check(call: str, result: tuple[Any, ...]) -> Any:
    """Unpack a ``cuda.bindings`` ``(err, *values)`` tuple, raising on error."""
    err, *values = result
    if int(err) != 0:
        raise CudaDriverError(call, err)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
