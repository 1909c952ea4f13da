"""TPWorkers: rank 0's side of tensor parallelism.

Rank 0 is the engine's own process: it schedules, samples and serves. This
object starts its node's other ranks (``spawn``; other nodes start theirs
with ``--node-rank``, torchrun starts everyone), joins the group with them,
sends each step's plan, and turns a lost rank into :class:`WorkerDiedError`
naming it, never a hang:

* a watcher thread learns of a dead worker at once (process sentinels here,
  death notices from other nodes); on CUDA it then aborts the NCCL group, so
  that a GPU wait on the dead peer's half of a collective returns;
* ``guard`` wraps every engine call that talks to the workers: it raises the
  recorded death before and after the call, and when a collective fails inside
  (gloo notices a closed connection at once), it waits briefly for the death
  that explains it and raises that instead.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from vtensor.distributed import TPGroup, WorkerDiedError
from vtensor.distributed.launch import (
    LaunchSpec,
    connect_store,
    host_store,
    init_group,
    multicast_off,
    wait_for_ranks,
)
from vtensor.distributed.procs import LocalWorker, WorkerMonitor, spawn_workers, stop_workers
from vtensor.models.config import ModelConfig
from vtensor.models.parallel import ModelShard

from .config import DeviceUnavailableError, EngineConfig
from .executor import StepPlan
from .setup import RankParts, build_rank, resolve_device
from .tp_worker import (
    ArenaQuery,
    ArenaReport,
    Precompile,
    Shutdown,
    arena_report,
    launch_spec,
    process_rank,
    worker_main,
)

log = logging.getLogger("vtensor.engine")
DEATH_GRACE_S = 5.0  # after a failed collective: how long to wait for the death behind it
STOP_GRACE_S = 30.0  # for workers to exit after Shutdown


def start_rank_zero(config: EngineConfig, cfg: ModelConfig) -> tuple[TPWorkers | None, RankParts]:
    """The engine's process's parts; with tensor parallelism the workers are started and
    the group joined first (a model that cannot split fails before any process starts)."""
    if not config.is_parallel:
        return None, build_rank(config, TPGroup(), None)
    ModelShard.of(cfg, 0, config.tensor_parallel_size)
    workers = TPWorkers.start(config)
    try:
        with workers.guard():  # building is collective in places: a lost worker fails it
            return workers, build_rank(config, workers.group, workers.spec.local_rank(0))
    except BaseException:
        workers.close()
        raise


def talking_to(workers: TPWorkers | None) -> AbstractContextManager[None]:
    """For an engine call that sends the workers something: a lost one fails it loudly."""
    return workers.guard() if workers is not None else nullcontext()


class TPWorkers:
    def __init__(self, spec: LaunchSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.local: list[LocalWorker] = []
        self.monitor: WorkerMonitor | None = None
        self.group = TPGroup()
        self._closed = False
        self._in_sync = True  # False once a call failed midway: workers may be mid-collective
        atexit.register(self._at_exit)

    @classmethod
    def start(cls, config: EngineConfig) -> TPWorkers:
        """Start this node's workers and join the group as rank 0."""
        multicast_off()
        spec, rank = launch_spec(config), process_rank(config)
        if rank != 0:
            raise RuntimeError(
                f"this process is tensor-parallel rank {rank}: the engine runs on rank 0; "
                "every other rank calls vtensor.engine.tp_worker.run_node(config)"
            )
        device = resolve_device(config.device, spec.local_rank(0))
        if device.type == "cuda" and torch.cuda.device_count() < spec.local_size:
            raise DeviceUnavailableError(
                f"{spec.local_size} tensor-parallel ranks on this node need as many GPUs; "
                f"torch sees {torch.cuda.device_count()}"
            )
        self = cls(spec, device)
        try:
            self._join(config)
        except BaseException:
            self.close()
            raise
        return self

    def _join(self, config: EngineConfig) -> None:
        if self.spec.torchrun:  # torchrun watches the processes; collectives still fail
            self.monitor = WorkerMonitor([], on_death=self._abort_device_group)
            self.group = init_group(self.spec, None, 0, self.device)
            return
        store, self.spec = host_store(self.spec)
        spec = self.spec
        self.local = spawn_workers(worker_main, range(1, spec.local_size), (config, spec))
        self.monitor = WorkerMonitor(
            self.local, connect_store(spec), remote=range(spec.local_size, spec.world_size),
            on_death=self._abort_device_group,
        )  # fmt: skip
        with self.guard():
            wait_for_ranks(store, range(1, spec.world_size), spec.timeout_s, self.check)
            self.group = init_group(spec, store, 0, self.device)

    # ------------------------------------------------------------ each step
    def send(self, msg: StepPlan | ArenaQuery | Precompile | Shutdown) -> None:
        """Broadcast a message to every worker (they handle messages in order)."""
        self.group.broadcast_object(msg)

    def reports(self, parts: RankParts) -> list[ArenaReport]:
        """Every rank's arena report, rank 0's first (waits for every mapper)."""
        self.send(ArenaQuery())
        reports = self.group.gather_objects(arena_report(self.group, parts))
        assert reports is not None  # rank 0 gathers
        return reports

    def check(self) -> None:
        """Raise the recorded death of a worker, if any."""
        if self.monitor is not None:
            self.monitor.raise_if_dead()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a call that talks to the workers; a lost worker raises WorkerDiedError."""
        self.check()
        try:
            yield
        except WorkerDiedError:
            self._in_sync = False
            raise
        except BaseException as exc:
            self._in_sync = False
            died = self.monitor.wait_for_death(DEATH_GRACE_S) if self.monitor else None
            if died is not None and isinstance(exc, Exception):
                raise died from exc
            raise
        self.check()

    # --------------------------------------------------------------- the end
    def close(self) -> None:
        """Tell the workers to exit and leave the group with them; stop what is left.

        Orderly (every worker alive and in step): a ``Shutdown``, then every rank
        destroys the group at once (NCCL's destroy is collective within a node, so
        rank 0 must not wait for the workers' exit first). Otherwise rank 0 aborts
        its side, which waits for no one, and the workers are stopped."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        dead = self.monitor is not None and self.monitor.error is not None
        if self.monitor is not None:
            self.monitor.stop()  # from here on, workers exit on purpose
        # Workers that may sit in a collective rank 0 left midway would read a Shutdown
        # as that collective's data: stop them instead.
        orderly = self.group.size > 1 and not dead and self._in_sync
        if orderly:
            try:
                self.send(Shutdown())
            except Exception as exc:  # a worker died just now: stopped below anyway
                log.warning("could not tell the workers to shut down: %s", exc)
                orderly = False
        self._leave(orderly)
        stop_workers(self.local, STOP_GRACE_S if orderly else 1.0)

    def _leave(self, orderly: bool) -> None:
        if not dist.is_initialized():
            return
        try:
            if orderly or self.device.type != "cuda":
                dist.destroy_process_group()
            else:  # a peer is gone or stuck: NCCL's destroy would wait for it
                dist.distributed_c10d._abort_process_group()
        except Exception as exc:
            log.warning("leaving the tensor-parallel group: %s", exc)

    def _abort_device_group(self, error: WorkerDiedError) -> None:
        """On the watcher thread: a GPU wait on a dead peer's collective would last until
        NCCL's timeout; aborting the communicator ends it (the step then fails)."""
        group: Any = self.group.device_group
        if self.device.type != "cuda" or group is None:
            return
        try:
            group.abort()
        except Exception as exc:
            log.warning("aborting the NCCL group after %s: %s", error, exc)

    def _at_exit(self) -> None:
        """An engine never closed: stop the workers, or the interpreter waits for them."""
        if not self._closed:
            self._closed = True
            if self.monitor is not None:
                self.monitor.stop()
            stop_workers(self.local, 0.0)
