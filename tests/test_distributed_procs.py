"""vtensor.distributed alone: the worker watcher (real spawned processes that die, a
real TCPStore) and the control group's object broadcast."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from vtensor.distributed import LaunchSpec
from vtensor.distributed.group import FRAME_BYTES
from vtensor.distributed.launch import connect_store, host_store, init_group, leave_group
from vtensor.distributed.procs import (
    WorkerDiedError,
    WorkerMonitor,
    post_error,
    spawn_workers,
    stop_workers,
)


def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))


def _fail(port: int, code: int, rank: int) -> None:
    """A worker that posts its error, as ``tp_worker.worker_main`` does, then exits."""
    post_error(_client(port), rank, ValueError(f"rank {rank} could not load its shard"))
    os._exit(code)


def _wait(port: int, rank: int) -> None:
    _client(port).set(f"up/{rank}", "1")
    time.sleep(120)


@pytest.fixture
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))  # fmt: skip


def test_a_local_death_names_the_rank_how_it_ended_and_its_error(store: dist.TCPStore) -> None:
    code = 3 + os.getpid() % 50
    workers = spawn_workers(_fail, [7], (store.port, code))
    deaths: list[WorkerDiedError] = []
    monitor = WorkerMonitor(workers, _client(store.port), on_death=deaths.append)
    try:
        err = monitor.wait_for_death(30.0)
        assert err is not None and deaths == [err] and err.rank == 7
        assert str(err) == (
            f"tensor-parallel worker rank 7 exited with code {code} after "
            "ValueError: rank 7 could not load its shard"
        )
        with pytest.raises(WorkerDiedError):
            monitor.raise_if_dead()
    finally:
        monitor.stop()
        stop_workers(workers, 1.0)


def test_another_nodes_death_reaches_rank_0_through_the_store(store: dist.TCPStore) -> None:
    """Node 1's launcher watches its own worker and posts its death; rank 0 only polls."""
    workers = spawn_workers(_wait, [5], (store.port,))
    node1 = WorkerMonitor(workers, _client(store.port), post_deaths=True)
    rank0 = WorkerMonitor([], _client(store.port), remote=[4, 5])
    try:
        store.wait(["up/5"])
        assert rank0.wait_for_death(0.6) is None  # alive: nothing to report
        os.kill(workers[0].process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        err = rank0.wait_for_death(10.0)
        assert err is not None and err.rank == 5
        assert str(err) == "tensor-parallel worker rank 5 was killed by SIGKILL"
        assert time.monotonic() - t0 < 5.0
    finally:
        rank0.stop()
        node1.stop()
        stop_workers(workers, 1.0)


def test_an_orderly_stop_is_not_a_death(store: dist.TCPStore) -> None:
    workers = spawn_workers(_wait, [1], (store.port,))
    monitor = WorkerMonitor(workers, _client(store.port))
    store.wait(["up/1"])
    monitor.stop()  # the engine closes: workers exit on purpose from here on
    stop_workers(workers, 0.0)
    assert not workers[0].process.is_alive()
    assert monitor.error is None


def _receive(spec: LaunchSpec, count: int, rank: int) -> None:
    """Rank 1: receive ``count`` objects from rank 0 and post what came."""
    store = connect_store(spec)
    group = init_group(spec, store, rank, torch.device("cpu"))
    for i in range(count):
        store.set(f"got/{i}", repr(group.broadcast_object(None)))
    leave_group()


def test_objects_of_any_size_cross_the_control_group() -> None:
    """One frame, exactly a full frame, and a frame plus a second broadcast."""
    payloads = [{"small": 1}, b"", b"x" * random.randrange(1, 5), list(range(40_000))]
    fill, room = FRAME_BYTES, FRAME_BYTES - 8
    while (size := len(pickle.dumps(b"y" * fill, protocol=pickle.HIGHEST_PROTOCOL))) != room:
        fill += room - size
    payloads += [b"y" * fill, b"y" * (fill + 1)]  # exactly what the first frame holds; one more
    store, spec = host_store(LaunchSpec(2))
    workers = spawn_workers(_receive, [1], (spec, len(payloads)))
    try:
        group = init_group(spec, store, 0, torch.device("cpu"))
        for p in payloads:
            assert group.broadcast_object(p) is p
        for i, p in enumerate(payloads):
            assert store.get(f"got/{i}").decode() == repr(p)
        leave_group()
    finally:
        stop_workers(workers, 10.0)
    assert workers[0].process.exitcode == 0
