"""Reading small results back from the GPU without holding the GIL, and later.

``tensor.tolist()`` on a CUDA tensor waits for the GPU *holding the GIL*: for
the whole forward pass (~10 ms at batch 64 on an 8B model) no other Python
thread runs. The mapper thread, which maps the KV chunks the next steps need,
and the server's HTTP thread then only progress in the gaps between steps, and
the engine ends up waiting on them. Here the wait happens in
``Event.synchronize``, which releases the GIL, so their work overlaps the GPU's.

:class:`HostCopy` splits the transfer in two: :meth:`HostCopy.start` queues
the copies behind the work that produces the tensors and returns at once;
:meth:`HostCopy.lists` waits. Async scheduling launches the next step between
the two, so the host's bookkeeping of one step overlaps the GPU's next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class HostCopy:
    """Device tensors on their way to pinned host memory, read with :meth:`lists`."""

    def __init__(self, hosts: list[torch.Tensor], done: torch.cuda.Event | None) -> None:
        self._hosts = hosts
        self._done = done

    @classmethod
    def start(cls, tensors: Sequence[torch.Tensor]) -> HostCopy:
        """Queue copies of ``tensors`` (all on one device) and return without waiting.

        Invariant relied on: a copy is queued on the current stream behind the kernels
        that write its source, so later kernels that reuse the source's memory (a
        graph's static output, say) cannot overwrite it before it is read.
        """
        if not tensors or not tensors[0].is_cuda:
            return cls([t.detach() for t in tensors], None)
        hosts = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            hosts.append(host)
        done = torch.cuda.Event()
        done.record()
        return cls(hosts, done)

    def lists(self) -> list[list[Any]]:
        """The tensors as (nested) Python lists, waiting for them if need be."""
        if self._done is not None:
            self._done.synchronize()  # releases the GIL while it waits
        return [h.tolist() for h in self._hosts]


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without waiting for the GPU.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory, which first
    waits for all work queued on the stream: under async scheduling that is the
    step being overlapped. A pinned source makes the copy truly asynchronous.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
