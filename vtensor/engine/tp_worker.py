"""A tensor-parallel worker: every rank but 0. No scheduler, no sampler, no requests.

A worker builds its rank's model shard, arena and runner exactly as rank 0
does (``setup.build_rank``), then does what rank 0's messages say, in order,
over the gloo control group:

* :class:`StepPlan` (``executor.py``): apply the KV commands to its own arena, run
  the same forward pass (its half of every collective), and take rank 0's sampled
  tokens into its token table. It never reads a token on the host, so it never
  waits for its GPU: with async scheduling it queues step N+1 while N runs.
* :class:`ArenaQuery`: report its arena's mapped chunks, which of them share a
  physical chunk and what the prefix cache holds (``check_integrity`` compares
  them with rank 0's: the worker must mirror every command, the prefix cache's
  shared maps, holds and drops included).
* :class:`Precompile`: compile the decode kernel's variants (serve's warm-up).
* :class:`Shutdown`: close the arena and the pool, leave the group, exit 0.

A worker started by ``spawn`` exits when its parent does. One that raises
posts its error in the store for rank 0's report, then exits 1.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vtensor.distributed.group import TPGroup
from vtensor.distributed.launch import (
    LaunchSpec,
    connect_store,
    init_group,
    leave_group,
    multicast_off,
    under_torchrun,
)
from vtensor.distributed.procs import WorkerMonitor, post_error, spawn_workers, stop_workers
from vtensor.kvcache.arena import ChunkSignature

from .config import EngineConfig
from .executor import StepExecutor, StepPlan
from .kv_setup import SCRATCH_SLOT
from .setup import RankParts, build_rank, resolve_device
from .stats import StepCounters


@dataclass(frozen=True)
class ArenaQuery:
    """Rank 0 asks every worker for an :class:`ArenaReport` (a gather follows)."""


@dataclass(frozen=True)
class ArenaReport:
    rank: int
    mapped: list[int]  # chunk indices mapped in the arena
    pool_in_use: int
    pool_references: int  # mappings plus the prefix cache's holds
    signature: ChunkSignature  # which mappings share a chunk, what the cache holds


@dataclass(frozen=True)
class Precompile:
    """Compile the attention backend's kernel variants now (``warmup.warm_up``)."""


@dataclass(frozen=True)
class Shutdown:
    """The engine closes: workers release their arenas and exit."""


def launch_spec(config: EngineConfig) -> LaunchSpec:
    """The rendezvous of ``config``: torchrun's environment when it started us."""
    tp, timeout = config.tensor_parallel_size, config.distributed_timeout_s
    if under_torchrun():
        return LaunchSpec.from_env(tp, timeout)
    return LaunchSpec(tp, config.nnodes, config.node_rank, config.master_addr,
                      config.master_port, timeout)  # fmt: skip


def process_rank(config: EngineConfig) -> int:
    """This process's rank: torchrun's ``RANK``, else its node's first rank."""
    if under_torchrun():
        return int(os.environ["RANK"])
    return launch_spec(config).first_rank


def arena_report(group: TPGroup, parts: RankParts) -> ArenaReport:
    arena = parts.arena
    arena.wait_all()
    pool = parts.pool.stats()
    return ArenaReport(
        group.rank, arena.vt.mapped_indices(), pool.in_use, pool.references, arena.signature()
    )


def precompile(parts: RankParts) -> int:
    """The decode kernel's variants for this rank's query heads (reads the scratch row)."""
    row = parts.arena.layout.row_start(SCRATCH_SLOT)
    return parts.runner.attn.precompile(parts.model.shard.num_heads, row)


def worker_main(config: EngineConfig, spec: LaunchSpec, rank: int) -> None:
    """A spawned worker's entry point (``procs.spawn_workers`` appends the rank)."""
    multicast_off()
    _exit_with_parent(os.getppid())
    store = connect_store(spec)
    try:
        run_worker(config, spec, store, rank)
    except BaseException as exc:
        post_error(store, rank, exc)
        raise


def run_worker(config: EngineConfig, spec: LaunchSpec, store: dist.Store | None, rank: int) -> None:
    """Join the group as ``rank``, build the rank, serve rank 0's messages until shutdown."""
    local_rank = spec.local_rank(rank)
    device = resolve_device(config.device, local_rank)
    if device.type == "cpu":  # the node's ranks share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.local_size))
    group = init_group(spec, store, rank, device)
    parts = build_rank(config, group, local_rank)
    # On an error the group is broken (a peer may be gone, a kernel may wait for it
    # forever): no clean-up that could wait, the process's exit frees everything.
    serve(group, parts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    parts.runner.release_graphs()  # before leave_group: NCCL's destroy waits on them
    parts.arena.close()
    backend = parts.pool.backend
    parts.pool.close()
    backend.close()
    leave_group()


def serve(group: TPGroup, parts: RankParts) -> None:
    executor = StepExecutor(parts.arena, parts.runner, group, StepCounters())
    while True:
        msg = group.broadcast_object(None)
        if isinstance(msg, StepPlan):
            forward = executor.run(msg)
            if forward is not None:
                if msg.samples:
                    executor.write_tokens(forward, None)
                executor.mark_launched()
        elif isinstance(msg, ArenaQuery):
            group.gather_objects(arena_report(group, parts))
        elif isinstance(msg, Precompile):
            precompile(parts)
        elif isinstance(msg, Shutdown):
            return
        else:
            raise TypeError(f"rank {group.rank}: unknown message {type(msg).__name__}")


def run_node(config: EngineConfig) -> None:
    """A process that is not rank 0 (torchrun's rank > 0, or a node with ``node_rank >
    0``): serve as a worker until rank 0 shuts the group down. On a node it starts its
    node's other ranks and posts their deaths in the store for rank 0."""
    multicast_off()
    spec = launch_spec(config)
    rank = process_rank(config)
    if spec.torchrun:
        run_worker(config, spec, None, rank)
        return
    store = connect_store(spec)
    local = spawn_workers(worker_main, range(rank + 1, rank + spec.local_size), (config, spec))
    monitor = WorkerMonitor(local, connect_store(spec), post_deaths=True)
    try:
        run_worker(config, spec, store, rank)
    except BaseException as exc:
        post_error(store, rank, exc, dead=True)
        raise
    finally:
        monitor.stop()
        stop_workers(local, grace_s=30.0)


def _exit_with_parent(parent: int) -> None:
    """A spawned worker must not outlive rank 0's process (were it killed, its gloo
    connection closes and the worker's next receive fails; this covers a worker
    blocked elsewhere, on its GPU say)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="vtensor-parent-watch", daemon=True).start()
