"""An engine driven in-process at timed arrivals (no HTTP): each request is added at
its arrival time (``serve.arrival_times``: Poisson at ``rate``), the engine steps
until every one finishes, and each request's send, first-token and finish times are
kept (``benchmarks/arrivals_engine.py``, ``benchmarks/swap.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.outputs import StepOutput
from vtensor.engine.params import SamplingParams

from .datasets import SyntheticRequest
from .serve import RunArgs, arrival_times


@dataclass(frozen=True)
class ArrivalRun:
    """``perf_counter`` times per request id, in arrival order (dicts keep it)."""

    sent: dict[int, float]
    first: dict[int, float]  # its first token read
    done: dict[int, float]
    duration_s: float  # from the first arrival (offset 0) to the last finish

    def ttft_s(self) -> list[float]:
        return [self.first[r] - self.sent[r] for r in self.sent]


def run_arrivals(
    engine: LLMEngine,
    reqs: Sequence[SyntheticRequest],
    rate: float,
    step: Callable[[], list[StepOutput]] | None = None,
) -> ArrivalRun:
    """Add each request (greedy, exactly ``output_len`` tokens) at its arrival time and
    step (``step``, default ``engine.step``: a caller times or samples around it) until
    all finish; finished requests are popped. The engine must have nothing unfinished."""
    step = engine.step if step is None else step
    starts = arrival_times(len(reqs), RunArgs(rate, 1.0, None, 0))
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    t0, nxt = time.perf_counter(), 0
    while len(done) < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and starts[nxt] <= now:
            p = SamplingParams(max_tokens=reqs[nxt].output_len, ignore_eos=True, temperature=0)
            [rid] = engine.add_request(reqs[nxt].prompt_ids, p)
            sent[rid] = time.perf_counter()
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(0.001)
            continue
        for o in step():
            first.setdefault(o.rid, time.perf_counter())
            if o.finished:
                done[o.rid] = time.perf_counter()
                engine.pop(o.rid)
    return ArrivalRun(sent, first, done, time.perf_counter() - t0)
