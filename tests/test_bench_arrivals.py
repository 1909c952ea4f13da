"""``vtensor.bench.arrivals`` on the CPU (embedded tiny model): requests go in at their
arrival times, every one finishes with its exact output length, and the times kept are
ordered as a request lives (sent, first token, finished)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from vtensor.bench.arrivals import run_arrivals
from vtensor.bench.datasets import SyntheticRequest
from vtensor.bench.serve import RunArgs, arrival_times
from vtensor.engine.outputs import StepOutput


def _requests(n: int, vocab: int) -> list[SyntheticRequest]:
    rng = random.Random()
    lens = [(rng.randint(3, 20), rng.randint(2, 6)) for _ in range(n)]
    return [SyntheticRequest([rng.randrange(vocab) for _ in range(p)], o) for p, o in lens]


def test_arrivals_are_paced_and_every_request_finishes(make_llm: Callable[..., Any]) -> None:
    engine = make_llm(attention_backend="torch", max_num_seqs=3).engine
    reqs = _requests(8, engine.model_config.vocab_size)
    rate = 200.0  # ~5 ms apart: several arrive while others run
    lengths: dict[int, int] = {}
    t0 = time.perf_counter()

    def step() -> list[StepOutput]:
        outs = engine.step()
        for o in outs:
            lengths[o.rid] = lengths.get(o.rid, 0) + len(o.new_token_ids)
        return outs

    run = run_arrivals(engine, reqs, rate, step)
    assert set(run.sent) == set(run.first) == set(run.done) and len(run.sent) == len(reqs)
    # In arrival order, never before its arrival time, each with its exact length.
    starts = arrival_times(len(reqs), RunArgs(rate, 1.0, None, 0))
    for (rid, sent), start, q in zip(run.sent.items(), starts, reqs):
        assert sent - t0 >= start
        assert sent <= run.first[rid] <= run.done[rid]
        assert lengths[rid] == q.output_len
    assert all(t > 0 for t in run.ttft_s())
    assert run.duration_s >= starts[-1]
    assert not engine.has_unfinished() and not engine.requests  # all popped
