"""Which all-reduce a tensor-parallel group uses for its device tensors: the choice,
torch-free (the scheduler's rule: policies are unit-tested on the CPU without torch).

Two backends (``EngineConfig.all_reduce``, ``--all-reduce``):

* ``nccl`` (the default): every all-reduce is ``torch.distributed``'s, NCCL on GPUs
  and gloo on CPUs.
* ``symm-mem``: messages of at most ``symm_max_bytes`` (a decode step's
  ``[batch, hidden]`` row-parallel sums) go through PyTorch's symmetric-memory
  one-shot all-reduce (``torch.ops.symm_mem.one_shot_all_reduce_copy_out``): one
  kernel copies this rank's input into its symmetric buffer, waits for its peers
  (a barrier on P2P signal pads), then loads every peer's buffer over NVLink and
  sums them in rank order. P2P loads only: no NVLink multicast, no multimem
  instruction (the shared machines' rule, ``launch.MULTICAST_OFF``). Larger
  messages, other dtypes, and every message where symmetric memory cannot be
  set up (CPU/gloo, one GPU, an old torch, no P2P) go to NCCL as before.

vLLM's analogue is its custom all-reduce (on by default there, turned off with
``--disable-custom-all-reduce``, which this CLI accepts too: it picks ``nccl``).
"""

from __future__ import annotations

from dataclasses import dataclass

NCCL, SYMM_MEM = "nccl", "symm-mem"
ALL_REDUCE_BACKENDS = (NCCL, SYMM_MEM)
# The dtypes torch's one-shot kernel implements (it dispatches on float and bfloat16
# only): anything else, float16 included, takes NCCL.
SYMM_DTYPES = frozenset({"float32", "bfloat16"})
# Covers a decode step's [batch, hidden] bf16 sums up to batch 256 at hidden 8192 (4 MiB);
# the symmetric buffer is this large on every rank. Prefill's messages are larger and
# bandwidth-bound: NCCL's ring is built for those.
DEFAULT_SYMM_MAX_BYTES = 4 << 20
# The kernel moves 16-byte vectors when the size and offset allow: a message must at
# least be 4-byte aligned (its element size for fp32), and the input's offset in its
# storage must keep it as aligned as the symmetric buffer (which starts at offset 0).
SYMM_ALIGN = 16


@dataclass(frozen=True)
class AllReduceOptions:
    """How a group all-reduces its device tensors (validated on construction)."""

    backend: str = NCCL
    symm_max_bytes: int = DEFAULT_SYMM_MAX_BYTES

    def __post_init__(self) -> None:
        if self.backend not in ALL_REDUCE_BACKENDS:
            raise ValueError(
                f"unknown all-reduce backend {self.backend!r}; known: "
                f"{', '.join(ALL_REDUCE_BACKENDS)}"
            )
        if self.symm_max_bytes < SYMM_ALIGN or self.symm_max_bytes % SYMM_ALIGN:
            raise ValueError(
                f"all_reduce_symm_max_bytes must be a positive multiple of {SYMM_ALIGN}, "
                f"got {self.symm_max_bytes}"
            )

    @property
    def wants_symm(self) -> bool:
        return self.backend == SYMM_MEM


def symm_accepts(
    nbytes: int, dtype: str, contiguous: bool, offset_bytes: int, max_bytes: int
) -> bool:
    """Whether one message goes through the symmetric-memory one-shot all-reduce.

    Invariant relied on (no deadlock): the answer depends only on the message's size,
    dtype and layout, which every rank's identical forward pass gives alike, so all
    ranks take the same path for the same collective (one rank in NCCL while its peer
    waits at a symmetric-memory barrier would wait forever)."""
    return (
        0 < nbytes <= max_bytes
        and dtype in SYMM_DTYPES
        and contiguous
        and nbytes % 4 == 0
        and offset_bytes % SYMM_ALIGN == 0
    )


def symm_unavailable(
    device_type: str, world_size: int, one_node: bool, torch_has_ops: bool
) -> str | None:
    """Why symmetric memory cannot serve this group, checked before any collective (the
    same on every rank); ``None`` when it may (the rendezvous can still fail)."""
    if device_type != "cuda":
        return f"needs CUDA GPUs (this group runs on {device_type}: gloo)"
    if world_size < 2:
        return "a group of one rank has nothing to reduce"
    if not one_node:
        return "the group spans several nodes (symmetric memory is P2P within one node)"
    if not torch_has_ops:
        return "this torch has no torch.ops.symm_mem.one_shot_all_reduce_copy_out"
    return None
