"""Reading small results back from the GPU without holding the GIL.

``tensor.tolist()`` on a CUDA tensor waits for the GPU *holding the GIL*: for
the whole forward pass (~10 ms at batch 64 on an 8B model) no other Python
thread runs. The mapper thread, which maps the KV chunks the next steps need,
and the server's HTTP thread then only progress in the gaps between steps, and
the engine ends up waiting on them. Here the wait happens in
``Event.synchronize``, which releases the GIL, so their work overlaps the GPU's.
"""

from __future__ import annotations

from typing import Any

import torch


def to_host_list(t: torch.Tensor) -> list[Any]:
    """``t.tolist()``; on CUDA the GPU is awaited with the GIL released."""
    if not t.is_cuda:
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()
