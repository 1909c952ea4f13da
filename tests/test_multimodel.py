"""Two models on one shared KV pool (CPU): the same greedy tokens as each model alone,
and the busy model takes the memory the idle one holds, without preemption."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams, SharedKVPool
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine

CHUNK = 4096  # 8 tokens of these tiny models per chunk
COMMON: dict[str, Any] = dict(device="cpu", chunk_size=CHUNK, max_model_len=128)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    a, b = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("qwen2")
    make_checkpoint(a, "llama")
    make_checkpoint(b, "qwen2")
    return str(a), str(b)


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs
    )


def run_interleaved(engines: list[Any], prompts: list[list[list[int]]], max_tokens: int) -> list:
    """Queue every prompt on its engine, then step the engines in turn until all end."""
    rids = [e.add_requests(ps, greedy(max_tokens)) for e, ps in zip(engines, prompts)]
    while any(e.has_unfinished() for e in engines):
        for e in engines:
            if e.has_unfinished():
                e.step()
    return [[e.pop(g[0]).output_ids for g in groups] for e, groups in zip(engines, rids)]


def each_alone(
    make_llm: Callable[..., Any],
    paths: Any,
    prompts: list[Any],
    params: SamplingParams,
    **kw: Any,
) -> list[list[Any]]:
    """The reference: each model's outputs from an engine of its own (``kw``)."""
    return [make_llm(path, **kw).generate(ps, params) for path, ps in zip(paths, prompts)]


def token_ids(outputs: list[list[Any]]) -> list[list[list[int]]]:
    """Per model, each request's generated tokens."""
    return [[o.outputs[0].token_ids for o in outs] for outs in outputs]


def generate_on_threads(
    llms: list[Any], prompts: list[Any], params: SamplingParams, timeout: float
) -> list[list[Any]]:
    """Each ``LLM`` generates its prompts on a thread of its own, all at once, as the
    server's engines step; the outputs per model (an error in a thread fails)."""
    got: list[Any] = [None] * len(llms)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got[i] = llms[i].generate(prompts[i], params)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(llms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return got


def assert_leases_hold(pool: SharedKVPool, llms: list[Any]) -> None:
    """The shared budget's books balance and no engine's pool outgrew its lease."""
    assert pool.budget is not None and pool.budget.violations() == []
    for llm in llms:
        lease = llm.engine.lease
        assert llm.engine.pool.stats().created <= lease.fixed + lease.grant


def test_interleaved_requests_match_each_model_alone(
    two_checkpoints: tuple[str, str], make_llm: Callable[..., Any]
) -> None:
    paths = list(two_checkpoints)
    prompts = [random_prompts(6, 512, 3, 60), random_prompts(6, 512, 3, 60)]
    alone = token_ids(
        each_alone(make_llm, paths, prompts, greedy(20), kv_cache_bytes=96 * CHUNK, **COMMON)
    )
    pool = SharedKVPool(96 * CHUNK, device="cpu")
    shared = [make_llm(p, kv_pool=pool, **COMMON) for p in paths]
    got = run_interleaved([s.engine for s in shared], prompts, 20)
    assert got == alone
    assert alone[0] != alone[1]  # two different models: a mix-up would show
    stats = pool.stats()
    assert stats is not None and pool.budget is not None and pool.budget.violations() == []
    assert sum(x.fixed_chunks + x.granted_chunks for x in stats.leases) <= 96


def test_busy_model_takes_the_memory_the_idle_one_kept(
    two_checkpoints: tuple[str, str], make_llm: Callable[..., Any]
) -> None:
    """A budget that holds one model's burst, not both: B's burst leaves its chunks idle
    (deferred reclamation), then A's burst takes them and runs without preemption."""
    pool = SharedKVPool(72 * CHUNK, device="cpu")
    a, b = (make_llm(p, kv_pool=pool, **COMMON) for p in two_checkpoints)
    burst = [random_prompts(8, 512, 40, 56) for _ in range(2)]  # 8 x 8 chunks at the peak
    out_b = b.generate(burst[1], greedy(8))
    held_b = b.engine.kv.books.committed
    assert held_b >= 40, "B's burst should leave its chunks idle in its slots"
    out_a = a.generate(burst[0], greedy(8))
    assert sum(o.num_preemptions for o in out_a + out_b) == 0
    assert b.engine.kv.books.committed < held_b  # A took B's idle chunks
    assert pool.budget is not None and pool.budget.violations() == []
    for llm in (a, b):  # each engine's pool follows its lease: at most what it holds
        lease = llm.engine.lease
        assert llm.engine.pool.stats().created <= lease.fixed + lease.grant
    # And back: B's next burst takes A's idle chunks in turn.
    again = b.generate(burst[1], greedy(8))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in out_b]
    assert sum(o.num_preemptions for o in again) == 0


def test_refuses_a_pool_it_cannot_share(
    two_checkpoints: tuple[str, str], make_llm: Callable[..., Any]
) -> None:
    pool = SharedKVPool(64 * CHUNK, device="cpu")
    make_llm(two_checkpoints[0], kv_pool=pool, **COMMON)
    with pytest.raises(ValueError, match="same chunk size"):
        make_llm(two_checkpoints[1], kv_pool=pool, **{**COMMON, "chunk_size": 2 * CHUNK})
    with pytest.raises(ValueError, match="conflicts"):
        make_llm(two_checkpoints[1], kv_pool=pool, kv_cache_bytes=8 * CHUNK, **COMMON)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        make_llm(two_checkpoints[1], kv_pool=pool, enable_sleep_mode=True, **COMMON)
    twin = make_llm(two_checkpoints[0], kv_pool=pool, **COMMON)  # the same model again
    assert twin.engine.lease.name == two_checkpoints[0] + "#2"
    with pytest.raises(ValueError, match="already draws"):
        LLMEngine(
            EngineConfig(model=two_checkpoints[1], **COMMON), pool, name=twin.engine.lease.name
        )
    with pytest.raises(ValueError, match="positive"):
        SharedKVPool(0)


@pytest.mark.parametrize("budget_chunks", [40, 64, 160])
def test_two_engine_threads_on_one_pool_match_each_model_alone(
    two_checkpoints: tuple[str, str], make_llm: Callable[..., Any], budget_chunks: int
) -> None:
    """Like the server: each engine steps on its own thread, both busy at once. A budget
    too small for both peaks makes them take chunks from each other (between the other's
    steps, or through an ask it serves at its next step); the tokens stay each model's."""
    paths = list(two_checkpoints)
    prompts = [random_prompts(6, 512, 40, 56), random_prompts(6, 512, 40, 56)]
    budget = budget_chunks * CHUNK
    alone = token_ids(
        each_alone(make_llm, paths, prompts, greedy(16), kv_cache_bytes=budget, **COMMON)
    )
    pool = SharedKVPool(budget_chunks * CHUNK, device="cpu")
    shared = [make_llm(p, kv_pool=pool, **COMMON) for p in paths]
    assert token_ids(generate_on_threads(shared, prompts, greedy(16), timeout=120)) == alone
    assert_leases_hold(pool, shared)


def test_one_request_is_limited_to_the_budget_less_every_engines_scratch(
    two_checkpoints: tuple[str, str], make_llm: Callable[..., Any]
) -> None:
    """10 chunks of 8 tokens: alone an engine could give one request 9 (72 tokens); with
    a second engine's scratch chunk held for good, 8 (64 tokens), and its contract says
    so, instead of queueing a request that could never be admitted."""
    pool = SharedKVPool(10 * CHUNK, device="cpu")
    a = make_llm(two_checkpoints[0], kv_pool=pool, **COMMON)
    assert a.engine.inputs.max_request_len == 72
    b = make_llm(two_checkpoints[1], kv_pool=pool, **COMMON)
    assert a.engine.inputs.max_request_len == b.engine.inputs.max_request_len == 64
    prompt = random_prompts(1, 512, 50, 51)[0]
    with pytest.raises(ValueError, match="max_tokens"):
        a.generate([prompt], greedy(15))  # 65 tokens: refused, nothing queued
    assert not a.engine.has_unfinished()
    out = a.generate([prompt], greedy(14))  # 64 tokens: the whole budget but b's scratch
    assert len(out[0].outputs[0].token_ids) == 14
