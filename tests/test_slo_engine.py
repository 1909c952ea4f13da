"""SLO-aware admission in the engine on the CPU (tiny model, fp32, tiny pool, a manual
request clock): a late short request behind long-running ones gets one of them swapped
out for it, and every greedy output equals the engine without SLOs; without a host tier
nothing is swapped; attainment reaches the stats and /metrics; the flags parse."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams
from vtensor.engine.request import Request
from vtensor.kvcache.idle_policy import ManualClock

CHUNK = 4096  # the embedded model in fp32: 1 KiB per token, 4 tokens per chunk
LONG_NEW, SHORT_NEW = 60, 6
STEP_S = 0.01  # the manual request clock's time per step
TIGHT = dict(
    chunk_size=CHUNK,
    kv_cache_bytes=40 * CHUNK,
    max_num_seqs=4,
    max_num_batched_tokens=16,
    dtype="float32",
    enable_prefix_caching=False,
)


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def reference(make_llm: Any, longs: list[list[int]], short: list[int]) -> list[list[int]]:
    """The engine without SLOs (and room for all): the greedy outputs to match."""
    llm = make_llm(chunk_size=CHUNK, dtype="float32")
    outs = llm.generate([*longs, short], [params(LONG_NEW)] * 2 + [params(SHORT_NEW)])
    return [o.outputs[0].token_ids for o in outs]


def fill_with_longs(
    engine: Any, longs: list[list[int]], short_len: int, long_params: SamplingParams
) -> tuple[ManualClock, list[int]]:
    """A manual request clock; the long requests decode until a prompt of ``short_len``
    tokens no longer fits, none preempted. Returns the clock and the long ones' ids."""
    clock = ManualClock(100.0)
    engine.set_request_clock(clock)
    rids = [engine.add_request(p, long_params)[0] for p in longs]
    for _ in range(long_params.max_tokens or 0):
        engine.step()
        clock.advance(STEP_S)
        if engine.kv.admit_shortfall(short_len + 1, len(engine.scheduler.running)) > 0:
            break
    else:
        raise AssertionError("the long requests ended before filling the pool: no test")
    assert engine.stats().preemptions == 0, "the long requests preempted each other: no test"
    return clock, rids


def late_short_request(
    llm: Any,
    longs: list[list[int]],
    short: list[int],
    long_params: SamplingParams | None = None,
    short_params: SamplingParams | None = None,
) -> list[Request]:
    """Two long requests decode until a short prompt no longer fits; it arrives then, and
    waits 0.6 s (of a 1 s TTFT SLO) before the next step. Returns the finished requests."""
    short_params = short_params or params(SHORT_NEW)
    engine = llm.engine
    clock, rids = fill_with_longs(engine, longs, len(short), long_params or params(LONG_NEW))
    assert len(engine.scheduler.running) == 2 and not engine.scheduler.swapped
    rids.append(engine.add_request(short, short_params)[0])
    clock.advance(0.6)  # TTFT slack 0.4 s < half the SLO: urgent
    while engine.has_unfinished():
        engine.step()
        clock.advance(STEP_S)
    return [engine.pop(r) for r in rids]


def outputs(reqs: list[Request]) -> list[list[int]]:
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_late_short_request_gets_room_by_slo_swap_out(
    make_llm: Any, async_scheduling: bool
) -> None:
    longs, (short,) = random_prompts(2, 400, lo=10, hi=14), random_prompts(1, 400, lo=6, hi=9)
    ref = reference(make_llm, longs, short)
    llm = make_llm(
        **TIGHT,
        async_scheduling=async_scheduling,
        swap_space_bytes=64 * CHUNK,
        ttft_slo_ms=1000,
        tpot_slo_ms=1000,
        debug_check_every=1,
    )
    assert outputs(late_short_request(llm, longs, short)) == ref
    s = llm.engine.stats()
    assert s.slo_swap_outs >= 1 and s.swap_preemptions >= s.slo_swap_outs
    assert s.swap_in_bytes == s.swap_out_bytes > 0  # the victims came back, not recomputed
    assert s.slo_ttft_requests == 3 and s.slo_ttft_met == 3  # 0.6 s + a few steps < 1 s
    assert s.slo_tpot_requests == 3 and s.slo_tpot_met == 3
    from vtensor.server.metrics import ServerMetrics

    text = ServerMetrics().render(s, time.monotonic())
    assert f"vtensor_slo_swap_outs_total {s.slo_swap_outs}" in text
    assert "vtensor_slo_ttft_attainment 1.0" in text
    assert "vtensor_slo_tpot_met_total 3" in text


def test_the_same_scenario_without_slos_never_swaps(make_llm: Any) -> None:
    """The engine without the feature: the short request waits for memory instead. SLOs
    switched on between runs (``set_slo``, as benchmarks/swap.py does) then swap."""
    longs, (short,) = random_prompts(2, 400, lo=10, hi=14), random_prompts(1, 400, lo=6, hi=9)
    ref = reference(make_llm, longs, short)
    llm = make_llm(**TIGHT, swap_space_bytes=64 * CHUNK)
    engine = llm.engine
    assert engine.slo is None and engine.scheduler.admission is None
    assert outputs(late_short_request(llm, longs, short)) == ref
    s = engine.stats()
    assert s.swap_preemptions == 0 and s.slo_swap_outs == 0 and s.slo_ttft_requests == 0
    engine.set_slo(1000, 1000)
    assert engine.scheduler.admission is engine.slo is not None
    assert outputs(late_short_request(llm, longs, short)) == ref
    assert engine.stats().slo_swap_outs >= 1
    engine.add_request(short, params(SHORT_NEW))
    with pytest.raises(RuntimeError, match="no request unfinished"):
        engine.set_slo(None, None)
    while engine.has_unfinished():
        engine.step()
    engine.set_slo(None, None)
    assert engine.slo is None and engine.scheduler.admission is None


def test_without_a_host_tier_slos_swap_nothing_and_say_so(
    make_llm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    longs, (short,) = random_prompts(2, 400, lo=10, hi=14), random_prompts(1, 400, lo=6, hi=9)
    with caplog.at_level(logging.WARNING, logger="vtensor.engine.slo"):
        llm = make_llm(**TIGHT, ttft_slo_ms=1000, tpot_slo_ms=1000)
    assert any("without a host KV tier" in r.message for r in caplog.records)
    assert outputs(late_short_request(llm, longs, short)) == reference(make_llm, longs, short)
    s = llm.engine.stats()
    assert s.slo_swap_outs == 0 and s.slo_swaps_refused > 0 and s.preemptions == 0


def test_slo_flags_parse_and_reach_the_engine_config() -> None:
    from vtensor.cli_generate import add_engine_args, engine_kwargs
    from vtensor.engine.config import EngineConfig

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kwargs = engine_kwargs(p.parse_args(["--ttft-slo-ms", "500", "--tpot-slo-ms", "40.5"]))
    assert kwargs["ttft_slo_ms"] == 500 and kwargs["tpot_slo_ms"] == 40.5
    assert EngineConfig(**kwargs).slo_enabled
    off = engine_kwargs(p.parse_args([]))
    assert off["ttft_slo_ms"] is None and off["tpot_slo_ms"] is None
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        EngineConfig(**(off | {"ttft_slo_ms": -1.0}))
