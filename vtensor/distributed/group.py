"""TPGroup: the ranks a model is split across, and the collectives they use.

Two process groups over the same ranks, because they carry different things:

* ``device_group``: the model's tensors (row-parallel all-reduces, the vocab
  gather, the sampled tokens). NCCL on CUDA, so the collectives are queued on
  the current stream like any kernel and CUDA graphs capture them; gloo on the
  CPU. Its timeout bounds a collective that a dead or stuck rank never joins.
* ``cpu_group``: gloo, for small host objects (each step's plan, reports).
  Pure host traffic: it never waits for the GPU, so rank 0 can send step N+1's
  plan while step N still runs (async scheduling). Workers wait on it between
  steps for as long as the engine idles, so its timeout is long.

With ``size == 1`` every collective returns its input untouched and no process
group exists: a single-GPU model runs exactly the code it ran before.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; 2.11 (the
# GPU box) has only the old name. Same contract: output = inputs concatenated on dim 0.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# Host objects go in one fixed-size frame (8 bytes of length, then the pickle): a decode
# step's plan fits, so a step costs one broadcast, not broadcast_object_list's two (its
# sizes, then its data). A larger object sends the rest in a second broadcast.
FRAME_BYTES = 16 << 10


@dataclass(frozen=True)
class TPGroup:
    """One rank's place in the tensor-parallel group (rank 0 schedules and samples)."""

    rank: int = 0
    size: int = 1
    device_group: Any = None  # dist.ProcessGroup; None when size == 1
    cpu_group: Any = None  # dist.ProcessGroup (gloo); None when size == 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside a group of {self.size}")

    @property
    def is_driver(self) -> bool:
        """Rank 0: the one that schedules, samples and serves."""
        return self.rank == 0

    # -------------------------------------------------------- device tensors
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, n]`` on every rank -> ``[rows, size * n]``: rank ``r``'s columns at
        ``[r * n, (r + 1) * n)``, on every rank (an all-gather: NCCL has no gather)."""
        if self.size == 1:
            return x
        rows, n = x.shape
        out = x.new_empty(self.size * rows, n)
        _all_gather_single(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, rows, n).transpose(0, 1).reshape(rows, self.size * n)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype), in place."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.device_group)
        return x

    # ----------------------------------------------------------- host objects
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled over the gloo group; others pass any)."""
        if self.size == 1:
            return obj
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.is_driver else b""
        if self.is_driver:
            first = len(data).to_bytes(8, "little") + data[: FRAME_BYTES - 8]
            frame[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(frame, src=0, group=self.cpu_group)
        size = int.from_bytes(frame[:8].numpy().tobytes(), "little")
        payload = frame[8 : 8 + size].numpy().tobytes()
        if size > FRAME_BYTES - 8:
            rest = torch.empty(size - (FRAME_BYTES - 8), dtype=torch.uint8)
            if self.is_driver:
                rest.copy_(torch.frombuffer(bytearray(data[FRAME_BYTES - 8 :]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.cpu_group)
            payload += rest.numpy().tobytes()
        return obj if self.is_driver else pickle.loads(payload)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, by rank, on rank 0 (``None`` elsewhere)."""
        if self.size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_driver else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank gets it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())
