"""Where an async-scheduled decode step's time goes: host busy, host waiting, GPU busy.

python3 benchmarks/profile_async.py --shape llama3-8b --batch 64 --ctx 1024

Prints, per step: wall time; the host's wait for the previous step's tokens
(time the host had nothing to do); the GPU's kernel time (torch profiler); and
a graph replay alone, for the GPU's own cost of the step.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from profile_decode import start_decoding  # the script beside this one
from torch.profiler import ProfilerActivity, profile

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.sampler import PendingSample


def timed_steps(engine: LLMEngine, steps: int, waits: list[float]) -> float:
    waits.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def gpu_kernel_ms(engine: LLMEngine, steps: int) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages())
    return total_us / steps / 1e3


def replay_ms(engine: LLMEngine, steps: int) -> float:
    """Graph replays alone over the running requests' own slots and positions.

    (Results before 2026-11-21's last run replayed every row on one slot: its KV
    stayed in L2, so that figure understated the GPU's real cost of a step.)
    """
    graphs = engine.runner.graphs
    assert graphs is not None
    running = engine.scheduler.running
    slots = [engine.kv.slots.slot_of(r.rid) for r in running]
    rows = [engine.arena.layout.row_start(s) for s in slots]
    pos = [r.num_computed - 1 for r in running]  # rewrites each request's last KV row
    ids = [0] * len(running)
    from_table = [True] * len(running)  # as under async scheduling: ids from the table
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graphs.run(ids, from_table, slots, pos, rows)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def instrument(waits: list[float]) -> Callable[[], None]:
    """Time PendingSample.result (the host's wait); returns the undo."""
    original = PendingSample.result

    def result(self: PendingSample):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = original(self)
        waits.append(time.perf_counter() - t0)
        return out

    PendingSample.result = result  # type: ignore[method-assign]
    return lambda: setattr(PendingSample, "result", original)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    cfg = EngineConfig(shape=args.shape, max_num_seqs=args.batch, max_model_len=4096)
    waits: list[float] = []
    with LLMEngine(cfg) as engine:
        start_decoding(engine, args.batch, args.ctx, args.steps)
        undo = instrument(waits)
        for mode in (True, False):
            engine.runtime = replace(engine.runtime, async_scheduling=mode)
            step = timed_steps(engine, args.steps, waits)
            wait = sum(waits) / len(waits) * 1e3
            print(f"async={mode}: step {step:.2f} ms, host waits {wait:.2f} ms, "
                  f"host busy {step - wait:.2f} ms")  # fmt: skip
        gc.collect()
        gc.freeze()
        gc.disable()
        step = timed_steps(engine, args.steps, waits)
        gc.enable()
        print(f"async=False, gc off: step {step:.2f} ms")
        engine.runtime = replace(engine.runtime, async_scheduling=True)
        gc.disable()
        step = timed_steps(engine, args.steps, waits)
        gc.enable()
        print(f"async=True, gc off: step {step:.2f} ms")
        undo()
        print(f"GPU kernel time per step (async): {gpu_kernel_ms(engine, 10):.2f} ms")
        engine.step()  # read the last step, so every running request's KV is in place
        torch.cuda.synchronize()
        print(f"graph replay alone: {replay_ms(engine, args.steps):.2f} ms")


if __name__ == "__main__":
    main()
