"""The engine alone under timed arrivals (no HTTP): separates engine limits from the
server's. Prints what `vtensor bench serve` prints, for the random workload, and
the slowest steps with what they ran (a stall such as a compile shows there).

python3 benchmarks/arrivals_engine.py --shape llama3-8b --rate 16 --num-prompts 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from vtensor.bench.arrivals import run_arrivals
from vtensor.bench.datasets import random_dataset
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.outputs import StepOutput
from vtensor.engine.params import SamplingParams
from vtensor.engine.scheduler import SchedulerOutput
from vtensor.engine.warmup import warm_up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--rate", type=float, default=16.0)
    ap.add_argument("--num-prompts", type=int, default=300)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--warm-up", action="store_true", help="serve's warm-up first")
    args = ap.parse_args()
    cfg = EngineConfig(
        shape=args.shape or None,
        max_model_len=min(4096, args.input_len + args.output_len + 64),
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    with LLMEngine(cfg) as engine:
        if args.warm_up:
            print(f"warm-up {warm_up(engine):.1f}s")
        plans: list[tuple[float, int, int]] = []  # (time, prefill tokens, decode rows) per step
        schedule = engine.scheduler.schedule

        def logged() -> SchedulerOutput:
            out = schedule()
            pre = sum(sp.num_tokens for sp in out.spans if sp.num_tokens > 1)
            plans.append((time.perf_counter(), pre, sum(sp.num_tokens == 1 for sp in out.spans)))
            return out

        engine.scheduler.schedule = logged  # type: ignore[method-assign]
        vocab = engine.model_config.vocab_size
        reqs = random_dataset(args.num_prompts, args.input_len, args.output_len, vocab)
        [warm] = engine.add_request(reqs[0].prompt_ids[:32], SamplingParams(max_tokens=4))
        while engine.has_unfinished():
            engine.step()
        engine.pop(warm)
        times = StepTimes()
        run = run_arrivals(engine, reqs, args.rate, lambda: times.step(engine))
    dur, sent, first, done = run.duration_s, run.sent, run.first, run.done
    ttft = [1e3 * t for t in run.ttft_s()]
    tpot = [1e3 * (done[r] - first[r]) / (args.output_len - 1) for r in sent]
    fm, md = statistics.fmean, statistics.median
    print(f"rate {args.rate} budget {args.max_num_batched_tokens}: {len(reqs) / dur:.2f} req/s "
          f"over {dur:.1f}s; TTFT mean {fm(ttft):.0f} ms median {md(ttft):.0f} "
          f"p99 {p99(ttft):.0f}; TPOT mean {fm(tpot):.1f} ms median {md(tpot):.1f} "
          f"p99 {p99(tpot):.1f}")  # fmt: skip
    worst = sorted(range(len(ttft)), key=lambda i: -ttft[i])[:5]
    print("slowest TTFT (arrival index: ms): " + ", ".join(f"{i}: {ttft[i]:.0f}" for i in worst))
    print_slow_steps(plans)
    print(times.summary())


@dataclass
class StepTimes:
    """Steps timed by kind: decode-only (CUDA graphs) or with prefill tokens."""

    pure: int = 0
    pure_s: float = 0.0
    mixed: int = 0
    mixed_s: float = 0.0

    def step(self, engine: LLMEngine) -> list[StepOutput]:
        decode_only = all(s.num_computed == s.num_tokens - 1 for s in engine.scheduler.running)
        decode_only = decode_only and not engine.scheduler.waiting
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        if decode_only:
            self.pure, self.pure_s = self.pure + 1, self.pure_s + dt
        else:
            self.mixed, self.mixed_s = self.mixed + 1, self.mixed_s + dt
        return outs

    def summary(self) -> str:
        pure, mixed = self.pure, self.mixed
        return (f"steps: {pure} decode-only (graphs) at {1e3 * self.pure_s / max(pure, 1):.1f} ms, "
                f"{mixed} with prefill at {1e3 * self.mixed_s / max(mixed, 1):.1f} ms")  # fmt: skip


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def print_slow_steps(plans: list[tuple[float, int, int]], top: int = 8) -> None:
    """The longest gaps between schedules: with async scheduling a gap is mostly the
    step launched before it (read in that call), so both plans are printed."""
    busy = [i for i in range(len(plans) - 1) if plans[i][1] or plans[i][2]]  # not idle waits
    gaps = [(plans[i + 1][0] - plans[i][0], i) for i in busy]
    pre = [p for p in plans if p[1]]
    print(f"{len(plans)} steps, {len(pre)} with prefill tokens "
          f"(mean {statistics.fmean([p[1] for p in pre]) if pre else 0:.0f} tokens)")  # fmt: skip
    for gap, i in sorted(gaps, reverse=True)[:top]:
        prev = plans[i - 1] if i else (0.0, 0, 0)
        print(f"  step {i}: {1e3 * gap:.1f} ms; plan (prefill tokens, decode rows) "
              f"{plans[i][1:]}, previous {prev[1:]}")  # fmt: skip


if __name__ == "__main__":
    main()
