"""Which all-reduce should a TP decode step use? Candidates timed inside CUDA graphs.

Issue 16's 70B goal (decode step <= 1.3x the floor at batch 64, TP=2) missed at 1.44x:
the step's 161 NCCL all-reduces took 25-28 us each (4.6 ms of 27.7), far above what
their bytes need over NVLink. This script times, on 2+ GPUs of one host, the same
all-reduce a decode step makes ([batch, hidden] bf16), K of them back to back in one
CUDA graph (as a replayed step holds them), for each candidate:

* ``nccl``: ``dist.all_reduce`` (what the engine uses), NCCL's own protocol choice;
  run the script again with ``NCCL_PROTO=LL`` / ``LL128`` / ``Simple`` to compare;
* ``symm-one-shot-copy``: torch symmetric memory, one kernel that copies the input
  into this rank's symmetric buffer and sums every peer's buffer by P2P loads;
* ``symm-one-shot``, ``symm-two-shot``: a copy into the buffer, then the reduction.

The symmetric-memory candidates use peer-to-peer loads over NVLink only: NVLink
multicast stays off (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and the NCCL/NVSHMEM
variables are set before anything starts, the shared machines' rule), and no multimem
op is called. Every output is checked against an fp32 sum of every rank's input.

    python3 benchmarks/allreduce_candidates.py [--gpus 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(MULTICAST_OFF)  # before torch starts anything

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SHAPES = [(h, b) for h in (4096, 8192) for b in (1, 16, 64, 256)]  # 8B and 70B hidden
K = 64  # all-reduces per graph (a 70B step makes 161, an 8B one 65)
REPLAYS = 20
Candidate = Callable[[torch.Tensor], torch.Tensor]


def candidates(n: int, dev: torch.device, group_name: str) -> dict[str, Candidate]:
    out = torch.empty(n, dtype=torch.bfloat16, device=dev)

    def nccl(x: torch.Tensor) -> torch.Tensor:
        out.copy_(x)
        dist.all_reduce(out)
        return out

    found: dict[str, Candidate] = {"nccl": nccl}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
        symm_mem.rendezvous(buf, group_name)
    except Exception as exc:  # report the reason, time the rest
        print(f"symmetric memory unavailable: {exc!r}", file=sys.stderr)
        return found
    ops = torch.ops.symm_mem

    def one_shot_copy(x: torch.Tensor) -> torch.Tensor:
        return ops.one_shot_all_reduce_copy(buf, x, "sum", group_name)

    def one_shot(x: torch.Tensor) -> torch.Tensor:
        buf.copy_(x)
        return ops.one_shot_all_reduce_out(buf, "sum", group_name, out)

    def two_shot(x: torch.Tensor) -> torch.Tensor:
        buf.copy_(x)
        return ops.two_shot_all_reduce_out(buf, "sum", group_name, out)

    found.update({"symm-one-shot-copy": one_shot_copy, "symm-one-shot": one_shot,
                  "symm-two-shot": two_shot})  # fmt: skip
    return found


def time_in_graph(fn: Candidate, x: torch.Tensor) -> float:
    """Microseconds per call: K calls captured in one graph, replayed REPLAYS times."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # NCCL's watchdog queries events from its own thread: global capture mode would fail.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(K):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    graph.reset()  # before the group goes: NCCL waits on graphs holding its ops
    return start.elapsed_time(end) * 1e3 / (REPLAYS * K)


def rank_main(rank: int, world: int, port: int, json_path: str | None) -> None:
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=dev)  # fmt: skip
    name = dist.group.WORLD.group_name  # type: ignore[union-attr]
    rows: list[dict[str, Any]] = []
    for hidden, batch in SHAPES:
        n = hidden * batch
        x = torch.randn(n, dtype=torch.bfloat16, device=dev)
        every = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(every, x)
        want = torch.stack(every).float().sum(0)
        for label, fn in candidates(n, dev, name).items():
            got = fn(x).float()
            err = float((got - want).abs().max())
            ok = err <= 0.02 * float(want.abs().max()) + 1e-2
            us = time_in_graph(fn, x)
            rows.append(dict(candidate=label, hidden=hidden, batch=batch, kib=n * 2 / 1024,
                             us=us, max_err=err, ok=ok))  # fmt: skip
    if rank == 0:
        report(rows, world, json_path)
    dist.destroy_process_group()


def report(rows: list[dict[str, Any]], world: int, json_path: str | None) -> None:
    proto = os.environ.get("NCCL_PROTO", "(NCCL's choice)")
    print(f"all-reduce over {world} GPUs, bf16, {K} per graph; NCCL_PROTO {proto}")
    print(f"{'candidate':20} {'hidden':>6} {'batch':>5} {'KiB':>7} {'us each':>8}  output")
    for r in rows:
        check = "ok" if r["ok"] else f"WRONG (max error {r['max_err']:.3g})"
        print(f"{r['candidate']:20} {r['hidden']:>6} {r['batch']:>5} {r['kib']:>7.0f} "
              f"{r['us']:>8.2f}  {check}")  # fmt: skip
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"world": world, "nccl_proto": proto, "per_graph": K, "rows": rows}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs; torch sees {torch.cuda.device_count()}")
    mp.spawn(rank_main, args=(args.gpus, free_port(), args.json), nprocs=args.gpus)


if __name__ == "__main__":
    main()
