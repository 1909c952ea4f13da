"""The unified memory pool in the engine, on the CPU (fp32): greedy tokens equal the
static split's; a tight budget deflates mid-run (idle and cached KV, then preemption
by slack, or swap) with no request lost and every chunk accounted for (the fixtures
check integrity and the pool's balance; ``debug_check_every=1`` checks every step)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams
from vtensor.engine.config import EngineConfig
from vtensor.engine.input_processor import RequestError
from vtensor.server.metrics import ServerMetrics

CHUNK = 4096
NEW = 30
STEP = dict(chunk_size=CHUNK, max_num_seqs=4, max_num_batched_tokens=16, dtype="float32")
# The embedded model in fp32: 1 KiB of KV per token (4 tokens per chunk); its estimated
# workspace is 38 chunks for a 16-token step and 14 for 4 decodes. 62 chunks is the
# static split's 24 KV chunks plus that reserve: 6 requests of 50-60 tokens (13-15
# chunks each) overflow it, so the unified pool deflates while 4 of them decode.
TIGHT = 62 * CHUNK + CHUNK  # and the scratch slot's chunk


def greedy(llm: Any, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_the_table_is_built_and_monotone(make_llm: Any) -> None:
    llm = make_llm(unified_memory_pool=True, **STEP)
    memory = llm.engine.scheduler.memory
    table = memory.planner.table
    assert table.source == "estimated"  # the CPU has no allocator to measure with
    assert table.max_tokens == 16 and [t for t, _ in table.points] == [1, 2, 4, 8, 16]
    needs = [table.bytes_for(t) for t in range(17)]
    assert needs == sorted(needs) and needs[0] == 0 and needs[1] > 0
    assert memory.static_kv_capacity == memory.budget - table.chunks_for(16)
    assert llm.engine.kv.capacity_chunks == memory.kv_capacity


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("prefix", [False, True], ids=["nocache", "cache"])
def test_tight_unified_pool_matches_the_static_split(
    make_llm: Any, async_scheduling: bool, prefix: bool
) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    common = dict(**STEP, async_scheduling=async_scheduling, enable_prefix_caching=prefix)
    ref = greedy(make_llm(**common), prompts)
    unified = make_llm(**common, unified_memory_pool=True, kv_cache_bytes=TIGHT,
                       debug_check_every=1)  # fmt: skip
    assert greedy(unified, prompts) == ref
    assert all(len(t) == NEW for t in ref)  # none lost, none cut
    m = unified.memory_stats()
    assert m.kv_inflates > 0 and m.kv_deflates > 0
    assert m.deflate_preemptions > 0  # the tight budget really forced requests off
    assert m.unified_budget_bytes == 62 * CHUNK
    assert m.workspace_reserve_bytes is not None and m.kv_borrowed_bytes is not None


def test_kv_borrows_the_workspace_while_decoding(make_llm: Any) -> None:
    """Four requests decode with more KV than the static split's share: it is borrowed."""
    llm = make_llm(**STEP, unified_memory_pool=True, kv_cache_bytes=TIGHT, debug_check_every=1)
    engine, memory = llm.engine, llm.engine.scheduler.memory
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for p in random_prompts(4, 400, lo=14, hi=16):
        engine.add_request(p, params)
    borrowed = 0
    while engine.has_unfinished():
        engine.step()
        snap = memory.snapshot(engine.kv)
        assert snap.workspace + snap.kv_committed <= snap.budget
        borrowed = max(borrowed, snap.borrowed)
    assert borrowed > 0
    assert memory.kv_capacity > memory.static_kv_capacity  # decodes left it inflated


def test_swap_deflation_matches_recompute(make_llm: Any) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    ref = greedy(make_llm(**STEP), prompts)
    swap = make_llm(**STEP, unified_memory_pool=True, kv_cache_bytes=TIGHT, debug_check_every=1,
                    swap_space_bytes=64 * CHUNK, preemption_mode="swap")  # fmt: skip
    assert greedy(swap, prompts) == ref
    s = swap.engine.stats()
    assert s.swap_preemptions > 0 and s.swapped == 0
    assert s.host_tier_used_chunks == s.host_tier_spilled_chunks  # only spilled cache blocks stay


def test_roomy_unified_pool_matches_and_keeps_its_books(make_llm: Any) -> None:
    prompts = random_prompts(5, 400, lo=5, hi=60)
    ref = greedy(make_llm(**STEP), prompts, 12)
    llm = make_llm(**STEP, unified_memory_pool=True, debug_check_every=1)
    assert greedy(llm, prompts, 12) == ref
    m = llm.memory_stats()
    assert m.deflate_preemptions == 0  # room for everyone: nothing left the GPU
    text = ServerMetrics().render(llm.engine.stats(), 0.0, m)
    names = ("vtensor_memory_kv_borrowed_bytes", "vtensor_kv_inflates_total",
             "vtensor_kv_deflates_total", "vtensor_memory_workspace_reserve_bytes")  # fmt: skip
    for name in names:
        assert name in text
    static = ServerMetrics().render(llm.engine.stats(), 0.0, make_llm(**STEP).memory_stats())
    assert "kv_inflates_total" not in static


def test_a_request_that_cannot_fit_beside_the_workspace_is_refused(make_llm: Any) -> None:
    llm = make_llm(**STEP, unified_memory_pool=True, kv_cache_bytes=TIGHT, max_model_len=512)
    limit = llm.engine.inputs.max_request_len
    assert limit < 62 * 4  # the budget's chunks hold 4 tokens each; one step's reserve is less
    with pytest.raises(RequestError):
        llm.generate([[5] * limit], SamplingParams(max_tokens=1))
    out = llm.generate([[5] * (limit - 1)], SamplingParams(max_tokens=1, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 1


@pytest.mark.parametrize(
    "bad",
    [dict(tensor_parallel_size=2), dict(cpu_offload_gb=1.0), dict(enable_sleep_mode=True)],
    ids=["tp", "offload", "sleep"],
)
def test_unsupported_combinations_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unified_memory_pool"):
        EngineConfig(unified_memory_pool=True, **bad)


def test_a_shared_kv_pool_is_refused() -> None:
    from vtensor.engine.shared_pool import SharedKVPool

    pool = SharedKVPool(64 * CHUNK, device="cpu", chunk_size=CHUNK)
    with pytest.raises(ValueError, match="unified_memory_pool"):
        from vtensor import LLM

        LLM(kv_pool=pool, device="cpu", unified_memory_pool=True)


@pytest.mark.parametrize("command", [["generate"], ["serve"]])
def test_cli_flag(command: list[str]) -> None:
    from vtensor.cli import build_parser
    from vtensor.cli_generate import engine_kwargs

    on = build_parser().parse_args([*command, "--unified-memory-pool"])
    assert engine_kwargs(on)["unified_memory_pool"] is True
    assert engine_kwargs(build_parser().parse_args(command))["unified_memory_pool"] is False


def test_measuring_is_refused_on_the_cpu(make_llm: Any) -> None:
    from vtensor.engine.workspace_measure import measure_workspace

    with pytest.raises(RuntimeError, match="CUDA only"):
        measure_workspace(make_llm(unified_memory_pool=True, **STEP).engine)
