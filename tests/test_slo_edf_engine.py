"""Issue 14's SLO-admission failure, reproduced in the engine on the CPU (tiny model,
fp32, tiny pool, a manual request clock) and fixed: urgent short requests arrive one
after another while a request swapped out for the first of them waits in the host tier.

Before the fix the scheduler swapped nothing back in and admitted nothing while any
request was swapped out (FCFS between the queues): the second short request waited for
the victim to come back, though it fit. Now the waiting head goes first while the victim's
TPOT slack is larger than the head's TTFT slack (earliest deadline first). The SLO engine
must meet every TTFT where the engine without SLOs (FCFS: the shorts wait for the long
requests to finish) misses, with greedy outputs equal to a roomy engine's."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoints import random_prompts
from tests.test_slo_engine import CHUNK, LONG_NEW, STEP_S, TIGHT, fill_with_longs, params
from vtensor import SamplingParams
from vtensor.engine.request import Request

TTFT_SLO_MS = 1000
LATE_S = 0.8  # each short request waits this long before the next step: urgent (< 0.5 s left)
SHORT_NEW = 30  # the first short request runs 30 steps: its victim is out that long at least
STEPS_APART = 3  # steps between two short arrivals: the first one's victim is still out


def reference(make_llm: Any, longs: list[list[int]], shorts: list[list[int]]) -> list[list[int]]:
    llm = make_llm(chunk_size=CHUNK, dtype="float32")
    ps = [params(LONG_NEW)] * len(longs) + [params(SHORT_NEW)] * len(shorts)
    return [o.outputs[0].token_ids for o in llm.generate([*longs, *shorts], ps)]


def staggered_shorts(
    llm: Any,
    longs: list[list[int]],
    shorts: list[list[int]],
    long_params: SamplingParams | None = None,
    short_params: SamplingParams | None = None,
) -> list[Request]:
    """The long requests decode until the first short prompt no longer fits; then each
    short one arrives, the clock jumps ``LATE_S``, and ``STEPS_APART`` steps run."""
    short_params = short_params or params(SHORT_NEW)
    engine = llm.engine
    long_params = long_params or params(LONG_NEW)
    clock, rids = fill_with_longs(engine, longs, len(shorts[0]), long_params)
    for short in shorts:
        rids.append(engine.add_request(short, short_params)[0])
        clock.advance(LATE_S)
        for _ in range(STEPS_APART):
            engine.step()
            clock.advance(STEP_S)
    while engine.has_unfinished():
        engine.step()
        clock.advance(STEP_S)
    return [engine.pop(r) for r in rids]


def ttfts(reqs: list[Request]) -> list[float]:
    out = []
    for r in reqs:
        assert r.first_token_time is not None
        out.append(r.first_token_time - r.arrival)
    return out


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_slo_admission_meets_every_ttft_where_fcfs_misses(
    make_llm: Any, async_scheduling: bool
) -> None:
    longs = random_prompts(2, 400, lo=10, hi=14)
    shorts = random_prompts(3, 400, lo=24, hi=27)
    ref = reference(make_llm, longs, shorts)
    runs = {}
    for slo in (False, True):
        extra: dict[str, Any] = {"ttft_slo_ms": TTFT_SLO_MS, "tpot_slo_ms": 1000} if slo else {}
        llm = make_llm(
            **TIGHT,
            async_scheduling=async_scheduling,
            swap_space_bytes=64 * CHUNK,
            debug_check_every=1,
            **extra,
        )
        reqs = staggered_shorts(llm, longs, shorts)
        assert [r.output_ids for r in reqs] == ref
        runs[slo] = (ttfts(reqs)[len(longs) :], llm.engine.stats())
    fcfs, (slo_ttft, s) = runs[False][0], runs[True]
    assert max(fcfs) > TTFT_SLO_MS / 1e3, "FCFS met every TTFT: the scenario tests nothing"
    assert max(slo_ttft) <= TTFT_SLO_MS / 1e3 < max(fcfs)
    assert s.slo_swap_outs >= 1 and s.swap_in_bytes == s.swap_out_bytes > 0
    assert s.slo_ttft_met == s.slo_ttft_requests == len(longs) + len(shorts)
    assert s.slo_tpot_met == s.slo_tpot_requests
    assert runs[False][1].slo_swap_outs == 0  # (it may swap when the longs outgrow the pool)
