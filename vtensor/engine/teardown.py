"""An engine's teardown: its parts released in the one order that is safe
(``LLMEngine.close``, and a refused join of a shared KV pool). Each step says what
must already be gone before it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .llm_engine import LLMEngine


def release_parts(engine: LLMEngine) -> None:
    e = engine
    e.loop.inflight = None  # only aborted requests' tokens, dropped unread
    if e.runtime.device.type == "cuda":
        torch.cuda.synchronize(e.runtime.device)  # no kernel may touch chunks we unmap
    e.runner.release_graphs()  # first: NCCL's destroy waits on graphs holding its ops
    e.runner.release_workspace()  # its chunks are the pool's
    if e.spill is not None:  # its staging range: nothing mapped between copies
        e.spill.close()
    if e.workers is not None:
        e.workers.close()
    e.arena.close()
    backend = e.pool.backend
    e.pool.close()
    backend.close()
    if e.swap is not None:  # after the synchronize: no copy is in flight
        e.swap.close()
    if e.lease is not None:  # after the pool is closed: its chunks are gone
        e.lease.budget.leave(e.lease)
    if e.offload is not None:  # after the synchronize: no copy is in flight
        e.offload.close()
    if e.weights is not None:  # after the graphs: none may replay over them
        e.weights.close()
