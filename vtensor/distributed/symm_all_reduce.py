"""A faster all-reduce for small messages, beside NCCL: PyTorch's symmetric memory.

``TPGroup.all_reduce`` hands a message to the group's :class:`SmallAllReduce`
when it ``accepts`` it, else to NCCL. The one implementation,
:class:`SymmMemAllReduce`, is the one-shot all-reduce of
``torch.distributed._symmetric_memory`` over P2P loads (``all_reduce.py`` says
why and when). It is built by :func:`build_small_all_reduce` while the group
forms, before any CUDA graph is captured: the buffer's allocation and its
rendezvous are host work and a collective that a capture could not hold.

Every setup step ends with the ranks agreeing (a MIN over the gloo control
group) whether it worked everywhere: a rank whose step failed makes every rank
fall back to NCCL together, and no rank enters the next collective step (the
rendezvous) alone. Where symmetric memory is unavailable the reason is logged
once, by rank 0, and the group keeps NCCL for everything.
"""

from __future__ import annotations

import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .all_reduce import AllReduceOptions, symm_accepts, symm_unavailable

if TYPE_CHECKING:
    from .group import TPGroup

log = logging.getLogger("vtensor.distributed")
OP_NAME = "one_shot_all_reduce_copy_out"


class SmallAllReduce(ABC):
    """An all-reduce for some of a group's messages, used instead of NCCL for them.

    Contract:

    * built by every rank of the group, in step, before any CUDA graph capture;
    * ``accepts(x)`` depends only on ``x``'s size, dtype and layout, so every rank
      answers alike for the same collective (else one rank would wait in NCCL while
      its peer waits in this one: a deadlock);
    * ``__call__(x)`` sums ``x`` over the ranks in place and returns ``x``: queued on
      the current stream like any kernel (CUDA graphs capture it), every rank calling
      it for the same messages in the same order; the sum is bit-identical on every
      rank (each rank computes its next layer from it);
    * ``launches`` counts the calls made from the host (eager calls and captures; a
      graph's replays are not counted): how a test sees that it was used.
    """

    launches: int = 0

    @abstractmethod
    def accepts(self, x: torch.Tensor) -> bool: ...

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class SymmMemAllReduce(SmallAllReduce):
    """``torch.ops.symm_mem.one_shot_all_reduce_copy_out`` on one rendezvoused buffer.

    The kernel copies ``x`` into this rank's buffer, meets every peer at a barrier
    on the signal pads, loads each peer's buffer (NVLink P2P), adds them in rank
    order and writes ``x``; a closing barrier keeps a peer from overwriting its
    buffer (the next call) before everyone has read it, so one buffer serves every
    call in turn. ``out`` may be the input: each thread reads back and writes only
    the elements it copied itself, after the barrier."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int) -> None:
        self.buffer = buffer  # uint8, max_bytes, symmetric (rendezvoused)
        self.group_name = group_name
        self.max_bytes = max_bytes
        self.launches = 0
        self.op = getattr(torch.ops.symm_mem, OP_NAME)  # looked up once, not per call

    def accepts(self, x: torch.Tensor) -> bool:
        size = x.element_size()
        return x.device == self.buffer.device and symm_accepts(
            x.numel() * size, dtype_name(x.dtype), x.is_contiguous(),
            int(x.storage_offset()) * size, self.max_bytes,
        )  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The op requires the symmetric tensor and the output to have one shape; a
        # view at offset 0 of the buffer gives it (the rendezvous covers the storage).
        symm = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        self.launches += 1
        out: torch.Tensor = self.op(symm, x, "sum", self.group_name, x)
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_has_symm_ops() -> bool:
    """Whether this torch build has the module and the one-shot op we call."""
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError:
        return False
    return hasattr(torch.ops, "symm_mem") and hasattr(torch.ops.symm_mem, OP_NAME)


def agreed_steps(group: TPGroup, steps: Sequence[tuple[str, Callable[[], None]]]) -> str | None:
    """Run ``steps`` in order on every rank, agreeing after each whether it worked on
    all of them; stop at the first that failed anywhere. ``None``: all worked
    everywhere; else why not (this rank's own error, or which step failed elsewhere)."""
    for name, step in steps:
        error = None
        try:
            step()
        except Exception as exc:  # reported, and every rank falls back together
            error = f"{name} failed on rank {group.rank}: {exc!r}"
            if not group.is_driver:  # rank 0 logs the outcome; this is the cause
                log.warning("%s", error)
        if group.min_int(0 if error else 1) == 0:
            return error or f"{name} failed on another rank"
    return None


def build_small_all_reduce(
    options: AllReduceOptions, group: TPGroup, device: torch.device, one_node: bool
) -> SmallAllReduce | None:
    """The group's small-message all-reduce, or ``None`` (NCCL for everything; the reason
    logged once by rank 0 when ``options`` asked for symmetric memory)."""
    if not options.wants_symm or group.size == 1:
        return None
    reason = symm_unavailable(device.type, group.size, one_node, torch_has_symm_ops())
    # The checks above read only what every rank shares; agree anyway (one torch per node).
    if group.min_int(0 if reason else 1) == 0:
        _fall_back(group, reason or "unavailable on another rank")
        return None
    made: dict[str, Any] = {}
    reason = agreed_steps(group, _setup_steps(options, group, device, made))
    if reason is not None:
        _fall_back(group, reason)
        return None
    fast = SymmMemAllReduce(made["buffer"], made["name"], options.symm_max_bytes)
    if group.is_driver:
        log.info("all-reduce: symmetric-memory one-shot (P2P) for messages <= %d bytes "
                 "(bf16/fp32), NCCL for the rest", options.symm_max_bytes)  # fmt: skip
    return fast


def _setup_steps(
    options: AllReduceOptions, group: TPGroup, device: torch.device, made: dict[str, Any]
) -> list[tuple[str, Callable[[], None]]]:
    def allocate() -> None:
        # No implicit pool (newer torch's default): a buffer freed with a closed engine
        # would go back to the pool with its rendezvous cached under the group's name
        # ("0" for every WORLD group), and the next engine in this process could get
        # that block back, mapped to the old, gone peers. A plain allocation is
        # released when freed; the next one is rendezvoused afresh.
        os.environ.setdefault("TORCH_SYMMMEM_IMPLICIT_POOL", "0")
        import torch.distributed._symmetric_memory as symm_mem

        made["name"] = str(group.device_group.group_name)
        made["buffer"] = symm_mem.empty(options.symm_max_bytes, dtype=torch.uint8, device=device)

    def rendezvous() -> None:  # collective: every rank got here (the steps agree first)
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        # Older torch needs the group registered by name first. Newer torch (pytorch
        # PR 172163, Jan 2026) resolves the group itself and deprecates the call, which is
        # then harmful:
        # it caches the group's store under its name ("0" for every WORLD), so a second
        # engine in this process would meet its peers through the first group's store.
        if enable is not None and not getattr(enable, "__deprecated__", None):
            enable(made["name"])
        symm_mem.rendezvous(made["buffer"], made["name"])

    def check() -> None:  # one eager all-reduce against the sum it must give
        fast = SymmMemAllReduce(made["buffer"], made["name"], options.symm_max_bytes)
        n = min(1024, options.symm_max_bytes // 4)
        x = torch.arange(n, dtype=torch.float32, device=device) + group.rank
        want = torch.arange(n, dtype=torch.float32) * group.size + sum(range(group.size))
        got = fast(x).cpu()
        if not torch.equal(got, want):
            raise RuntimeError(f"wrong sum: max error {float((got - want).abs().max())}")

    return [("allocating the symmetric buffer", allocate),
            ("the symmetric-memory rendezvous", rendezvous),
            ("the first symmetric-memory all-reduce", check)]  # fmt: skip


def _fall_back(group: TPGroup, reason: str) -> None:
    if group.is_driver:
        log.warning("--all-reduce symm-mem: every all-reduce uses NCCL instead: %s", reason)
