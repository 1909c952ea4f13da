"""Where the ranks meet: a ``TCPStore`` rendezvous, then ``init_process_group``.

Two ways to get the processes, one rendezvous:

* **spawn** (the default): the process that builds the engine is rank 0; it
  hosts the store at ``master_addr:master_port`` (port 0: any free port, one
  node only) and starts its node's other ranks with ``torch.multiprocessing``
  (``spawn``). With ``nnodes > 1``, node ``k`` runs the same command with
  ``--node-rank k``: its process becomes rank ``k * L`` (``L`` ranks a node)
  and starts the node's other ``L - 1``.
* **torchrun**: it starts every process and sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_method="env://"``.

Rank ``r`` uses GPU ``r mod L`` of its node (``LOCAL_RANK`` under torchrun).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .group import TPGroup

# NVLink multicast (NVLS) stays off in every process: on the shared multi-GPU machines a
# program that uses it can take the host's GPUs out of service. Set before any process
# group exists; spawned children inherit the environment, and every rank sets them again
# itself (torchrun's and other nodes' processes do not inherit ours).
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Workers wait on the control group between steps for as long as the engine idles.
CONTROL_TIMEOUT = timedelta(days=365)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
READY = "vtensor/ready/{}"


def multicast_off() -> None:
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


@dataclass(frozen=True)
class LaunchSpec:
    """How the ranks of one tensor-parallel group find each other."""

    world_size: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, picked by rank 0's store (one node only)
    timeout_s: float = 600.0  # a collective's limit (a rank that never joins one)
    torchrun: bool = False  # ranks and rendezvous from torchrun's environment

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.nnodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be >= 1")
        if self.world_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.world_size} must be a multiple of nnodes "
                f"{self.nnodes} (the same number of ranks on every node)"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} outside [0, {self.nnodes})")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} is not a TCP port")
        if self.master_port == 0 and self.nnodes > 1 and not self.torchrun:
            raise ValueError("with nnodes > 1, give --master-port (every node must know it)")
        if self.timeout_s <= 0:
            raise ValueError("distributed timeout must be positive")

    @classmethod
    def from_env(cls, world_size: int, timeout_s: float) -> LaunchSpec:
        """The torchrun environment's spec (``WORLD_SIZE`` must be ``world_size``)."""
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world_size:
            raise ValueError(
                f"torchrun started {env_world} processes (WORLD_SIZE), but "
                f"tensor_parallel_size is {world_size}: they must agree"
            )
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return cls(world_size, master_addr=addr, master_port=port, timeout_s=timeout_s,
                   torchrun=True)  # fmt: skip

    @property
    def local_size(self) -> int:
        """Ranks per node."""
        return self.world_size // self.nnodes

    @property
    def first_rank(self) -> int:
        """This node's first rank (spawn): the launcher process's own."""
        return self.node_rank * self.local_size

    def local_rank(self, rank: int) -> int:
        if self.torchrun:
            return int(os.environ["LOCAL_RANK"])
        return rank % self.local_size

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)


def host_store(spec: LaunchSpec) -> tuple[dist.TCPStore, LaunchSpec]:
    """Rank 0's store; with port 0, the spec of the port it got."""
    store = dist.TCPStore(
        spec.master_addr, spec.master_port, spec.world_size, is_master=True,
        timeout=spec.timeout, wait_for_workers=False,
    )  # fmt: skip
    return store, replace(spec, master_port=store.port)


def connect_store(spec: LaunchSpec) -> dist.TCPStore:
    """A client of rank 0's store (retries until rank 0 is up, at most the timeout)."""
    return dist.TCPStore(spec.master_addr, spec.master_port, is_master=False,
                         timeout=spec.timeout)  # fmt: skip


def wait_for_ranks(
    store: dist.Store, ranks: Sequence[int], timeout_s: float, check: Callable[[], None]
) -> None:
    """Wait until every rank in ``ranks`` has checked in, calling ``check`` (which raises
    when a worker died) between polls, so that a worker lost during start-up fails the
    wait at once instead of after the timeout."""
    keys = [READY.format(r) for r in ranks]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        check()
        if time.monotonic() > deadline:
            missing = [r for r, k in zip(ranks, keys) if not store.check([k])]
            raise TimeoutError(f"tensor-parallel ranks {missing} did not join in {timeout_s:.0f} s")
        time.sleep(0.02)


def init_group(
    spec: LaunchSpec, store: dist.Store | None, rank: int, device: torch.device
) -> TPGroup:
    """Join the group as ``rank``: NCCL on CUDA, gloo on the CPU, plus the gloo control
    group. ``store`` is None under torchrun (``env://``)."""
    multicast_off()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is not None and rank != 0:
        store.set(READY.format(rank), "1")
    dist.init_process_group(
        backend,
        init_method="env://" if store is None else None,
        store=store,
        rank=rank,
        world_size=spec.world_size,
        timeout=spec.timeout,
        # Binds the NCCL communicator to this rank's GPU (created eagerly, not inside
        # the first collective, which may be a CUDA graph capture's warm-up).
        device_id=device if device.type == "cuda" else None,
    )
    cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, spec.world_size, dist.group.WORLD, cpu_group)


def leave_group() -> None:
    """Destroy this process's process groups, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
