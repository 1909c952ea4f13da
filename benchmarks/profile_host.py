"""Where a decode step's host time goes: cProfile over steady-state engine steps.

python3 benchmarks/profile_host.py --shape llama3-8b --batch 64 --ctx 1024
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from profile_decode import start_decoding  # the script beside this one

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    cfg = EngineConfig(shape=args.shape, max_num_seqs=args.batch, max_model_len=4096)
    with LLMEngine(cfg) as engine:
        start_decoding(engine, args.batch, args.ctx, args.steps)
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        print(f"engine step: {(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
