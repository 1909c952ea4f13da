"""Where a decode step's time goes: engine phases and the top GPU kernels.

python3 benchmarks/profile_decode.py --shape llama3-8b --batch 64 --ctx 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams


def start_decoding(engine: LLMEngine, batch: int, ctx: int, steps: int) -> None:
    """``batch`` requests of ``ctx`` tokens, stepped until all of them decode."""
    params = SamplingParams(max_tokens=10 * steps, ignore_eos=True, temperature=0)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request([(i + j) % vocab for j in range(ctx)], params)
    while engine.stats().waiting or any(r.num_output < 2 for r in engine.scheduler.running):
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    cfg = EngineConfig(shape=args.shape, max_num_seqs=args.batch, max_model_len=4096,
                       enforce_eager=args.enforce_eager)  # fmt: skip
    with LLMEngine(cfg) as engine:
        start_decoding(engine, args.batch, args.ctx, args.steps)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        graphs = engine.runner.graphs
        if graphs is not None:
            bs = args.batch
            ids, pos, rs = [0] * bs, [args.ctx] * bs, [engine.arena.layout.row_start(1)] * bs
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                graphs.run(ids, [False] * bs, [1] * bs, pos, rs)
            torch.cuda.synchronize()
            print(f"graph replay alone: {(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms")
        print(f"engine step: {step_ms:.2f} ms at batch {args.batch}, ctx ~{args.ctx}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.step()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))


if __name__ == "__main__":
    main()
