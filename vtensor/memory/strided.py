"""A strided view's placement in a byte range: shape and strides checked, and the
range it spans checked against the range's size (``VirtualTensor.view``).
Torch-free: a dtype enters only as its item size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import OutOfRangeError


@dataclass(frozen=True)
class StridedLayout:
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    start: int  # the first element's index (the byte offset over the item size)


def strided_layout(
    itemsize: int,
    shape: Sequence[int],
    strides: Sequence[int] | None,
    offset: int,
    nbytes: int,
) -> StridedLayout:
    """The layout of a view of ``shape`` (``strides`` in elements, contiguous when None)
    at byte ``offset`` (a multiple of ``itemsize``), within ``nbytes`` bytes."""
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides) if strides is not None else _contiguous(shape)
    if len(strides) != len(shape) or any(s < 0 for s in (*shape, *strides)):
        raise ValueError(f"bad shape {shape} / strides {strides}")
    if offset < 0 or offset % itemsize:
        raise OutOfRangeError(f"offset {offset} is not a multiple of {itemsize} bytes")
    elems = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    if offset + elems * itemsize > nbytes:
        raise OutOfRangeError(
            f"view of {elems * itemsize} bytes at offset {offset} exceeds the "
            f"{nbytes}-byte reservation"
        )
    return StridedLayout(shape, strides, offset // itemsize)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))
