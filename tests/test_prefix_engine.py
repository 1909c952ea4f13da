"""Prefix caching end to end on the CPU (fp32): the engine with the cache must give the
same greedy tokens as the engine without it, for multi-turn chats, shared system
prompts, preemption under a tiny pool, n > 1 and aborts mid-stream, while really
serving prompt tokens from the cache. Every engine is integrity-checked after
every step; at teardown the cache is reset and every chunk must come back."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint
from tests.greedy_walk import walk
from vtensor import SamplingParams
from vtensor.engine.integrity import IntegrityError
from vtensor.kvcache.manager import SharedChunkWriteError

BLOCK = 8  # the test checkpoint: 2 layers x 2 KV heads x 16 dims x K,V x fp32 = 512 B/token


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    make_checkpoint(tmp_path, "llama")  # clear top-token margins: greedy is stable
    return str(tmp_path)


def engines(make_llm: Callable[..., Any], ckpt: str, **kw: Any) -> tuple[Any, Any]:
    """The same engine with the prefix cache (checked every step) and without it."""
    kw = {"chunk_size": 4096, "debug_check_every": 1, **kw}
    on = make_llm(ckpt, enable_prefix_caching=True, **kw)
    off = make_llm(ckpt, enable_prefix_caching=False, **kw)
    assert on.engine.kv.cache.enabled and not off.engine.kv.cache.enabled
    assert on.engine.kv.cache.block_tokens == BLOCK
    return on, off


def ids(n: int) -> list[int]:
    return [random.randrange(2, 512) for _ in range(n)]


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def chat_rounds(llm: Any, questions: list[list[list[int]]], params: SamplingParams) -> list[Any]:
    """Conversations in lockstep: each round sends every conversation's whole history
    plus its next question, in one batch. Returns each round's outputs."""
    history: list[list[int]] = [[] for _ in questions]
    rounds = []
    for r in range(len(questions[0])):
        prompts = [h + q[r] for h, q in zip(history, questions)]
        outs = llm.generate(prompts, params)
        history = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
        rounds.append(outs)
    return rounds


def check_chats_match(
    on: Any,
    off: Any,
    questions: list[list[list[int]]],
    answer: int,
    block: int,
    walk_tol: float | None = None,
) -> None:
    """Multi-turn chats give the uncached engine's tokens, and each round after the
    first is served its history (earlier prompts and answers, bar the last sampled
    token, whose KV was never computed) from the cache, in whole blocks.

    With ``walk_tol``, answers are compared by ``tests/greedy_walk.py`` (GPU engines
    that batch differently may flip an fp32 near-tie); a conversation that flipped
    is compared no further, since its histories differ from there."""
    params = greedy(answer, logprobs=None if walk_tol is None else 2)
    a, b = chat_rounds(on, questions, params), chat_rounds(off, questions, params)
    live = list(range(len(questions)))
    for r, (xs, ys) in enumerate(zip(a, b)):
        if walk_tol is None:
            assert [x.outputs[0].token_ids for x in xs] == [y.outputs[0].token_ids for y in ys]
        else:
            pairs = [(xs[i].outputs[0], ys[i].outputs[0]) for i in live]
            w = walk([x for x, _ in pairs], [y for _, y in pairs], walk_tol, f"round {r}")
            live = [i for i, split in zip(live, w.diverged) if not split]
        for x, y, q in zip(xs, ys, questions):
            assert y.num_cached_tokens == 0
            history = len(x.prompt_token_ids) - len(q[r]) - 1 if r else 0
            assert x.num_cached_tokens == history // block * block, (r, history)
    assert len(live) >= len(questions) // 2, f"{len(questions) - len(live)} chats flipped a tie"


def abort_third_at(llm: Any, prompts: list[list[int]], params: SamplingParams, at: int) -> Any:
    """Run three requests, abort the third once ``at`` of its tokens are computed (KV
    computed, maybe a token in flight); returns the other two's output ids."""
    engine = llm.engine
    rids = [g[0] for g in engine.add_requests(prompts, params)]
    while engine.requests[rids[2]].num_computed < at:
        engine.step()
    engine.abort(rids[2])
    while engine.has_unfinished():
        engine.step()
    outs = [engine.requests[r].output_ids for r in rids[:2]]
    for r in rids:
        engine.pop(r)
    return outs


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_multi_turn_chats_match_the_uncached_engine(make_llm, ckpt: str, overlap: bool) -> None:
    on, off = engines(make_llm, ckpt, async_scheduling=overlap, max_num_batched_tokens=64)
    questions = [[ids(random.randint(5, 20)) for _ in range(4)] for _ in range(3)]
    check_chats_match(on, off, questions, 9, BLOCK)
    stats = on.engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_hit_rate > 0.3


def test_a_shared_system_prompt_is_computed_once(make_llm, ckpt: str) -> None:
    on, off = engines(make_llm, ckpt, max_num_seqs=4)
    system = ids(6 * BLOCK + 3)
    prompts = [system + ids(random.randint(1, 12)) for _ in range(10)]
    params = greedy(6, logprobs=2)
    a, b = on.generate(prompts, params), off.generate(prompts, params)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    for x, y in zip(a, b):
        for dx, dy in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert dx.keys() == dy.keys()
            assert max(abs(dx[t] - dy[t]) for t in dx) < 1e-4
    cached = [x.num_cached_tokens for x in a]
    assert cached[0] == 0 and all(c == 6 * BLOCK for c in cached[4:])  # after the 1st wave


def spy_admissions(llm: Any) -> list[tuple[int, int]]:
    """(preemptions so far, cached tokens) of every admission from now on."""
    seen: list[tuple[int, int]] = []
    sched = llm.engine.scheduler
    admit = sched._admit

    def spy(spans: Any, budget: int) -> Any:
        out = admit(spans, budget)
        seen.extend((a.req.num_preemptions, a.num_cached) for a in out)
        return out

    sched._admit = spy
    return seen


def test_preemption_under_a_tiny_pool_keeps_outputs(make_llm, ckpt: str) -> None:
    # 20 chunks of 8 tokens: the requests below cannot all grow at once.
    on, off = engines(make_llm, ckpt, kv_cache_bytes=20 * 4096, max_num_seqs=4)
    system = ids(3 * BLOCK)
    prompts = [system + ids(random.randint(3, 10)) for _ in range(5)]
    params = greedy(40)
    a, b = on.generate(prompts, params), off.generate(prompts, params)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    stats = on.engine.stats()
    assert stats.preemptions > 0 and off.engine.stats().preemptions > 0
    assert stats.prefix_cache_evicted_chunks > 0  # the pool was tight: blocks evicted
    assert stats.prefix_cache_hits >= len(system)


def test_a_preempted_request_recomputes_from_its_cached_prefix(make_llm, ckpt: str) -> None:
    """Older cached blocks go first (LRU), so the blocks a preempted request computed,
    prompt and output, are still cached when it is admitted again."""
    on, off = engines(make_llm, ckpt, kv_cache_bytes=20 * 4096, max_num_seqs=4)
    for llm in (on, off):
        llm.generate([ids(4 * BLOCK), ids(4 * BLOCK)], greedy(1))  # 8 old cached chunks
    seen = spy_admissions(on)
    prompts = [ids(random.randint(10, 20)) for _ in range(2)]
    a, b = on.generate(prompts, greedy(70)), off.generate(prompts, greedy(70))
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    again = [cached for preempted, cached in seen if preempted]
    assert on.engine.stats().preemptions > 0 and again
    assert all(c > 3 * BLOCK for c in again), seen  # beyond its prompt: output too


def test_n_samples_share_the_prompt(make_llm, ckpt: str) -> None:
    on, off = engines(make_llm, ckpt, max_num_seqs=2)
    prompt = ids(5 * BLOCK + 1)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=random.randrange(99), n=4)
    for params in (seeded, greedy(10, n=3)):
        a, b = on.generate([prompt], params)[0], off.generate([prompt], params)[0]
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert on.engine.stats().prefix_cache_hits >= 5 * 5 * BLOCK  # samples 2..n, twice


def test_abort_mid_stream_keeps_the_computed_prefix(make_llm, ckpt: str) -> None:
    on, off = engines(make_llm, ckpt, max_num_batched_tokens=16)
    prompts = [ids(30), ids(25), ids(40)]
    params = greedy(20)
    at = random.randint(2 * BLOCK, 45)  # mid-prefill or mid-decode
    assert abort_third_at(on, prompts, params, at) == abort_third_at(off, prompts, params, at)
    again = on.generate([prompts[2]], params)[0]
    assert again.num_cached_tokens > 0  # the aborted request's computed blocks
    assert again.outputs[0].token_ids == off.generate([prompts[2]], params)[0].outputs[0].token_ids


def test_a_step_that_would_write_into_a_cached_chunk_raises(make_llm, ckpt: str) -> None:
    llm = make_llm(ckpt, chunk_size=4096, max_num_batched_tokens=8)
    engine = llm.engine
    prompt = ids(4 * BLOCK)
    llm.generate([prompt], greedy(2))
    [rid] = engine.add_request([*prompt, *ids(5)], greedy(4))
    engine.step()  # admitted with a 3-block hit (the cap leaves one token): prefills on
    req = engine.requests[rid]
    assert req.num_cached_tokens == 4 * BLOCK and req.num_computed > 4 * BLOCK
    computed = req.num_computed
    req.num_computed = BLOCK + 3  # a bug that would recompute shared tokens
    with pytest.raises(SharedChunkWriteError, match="shared or cached"):
        engine.step()
    with pytest.raises(IntegrityError, match="will write is shared or cached"):
        engine.check_integrity()
    req.num_computed = computed
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pop(rid).output_ids) == 4


def test_reset_prefix_cache(make_llm, ckpt: str) -> None:
    llm = make_llm(ckpt, chunk_size=4096)
    engine = llm.engine
    prompt = ids(5 * BLOCK)
    llm.generate([prompt], greedy(3))
    assert engine.stats().prefix_cache_chunks == 5
    [rid] = engine.add_request(prompt, greedy(30))
    engine.step()
    assert not llm.reset_prefix_cache()  # a request runs: refused, nothing dropped
    assert engine.stats().prefix_cache_chunks >= 5
    engine.abort(rid)
    engine.pop(rid)
    assert llm.reset_prefix_cache()
    engine.arena.wait_all()
    assert engine.pool.stats().in_use == engine.kv.geometry.chunks_for(1)  # scratch only
    assert llm.generate([prompt], greedy(3))[0].num_cached_tokens == 0


def test_prefix_caching_switches_between_runs(make_llm, ckpt: str) -> None:
    llm = make_llm(ckpt, chunk_size=4096)
    engine = llm.engine
    prompt = ids(3 * BLOCK + 1)
    llm.generate([prompt], greedy(2))
    engine.set_prefix_caching(False)
    assert llm.generate([prompt], greedy(2))[0].num_cached_tokens == 0
    assert engine.stats().prefix_cache_chunks == 0
    engine.set_prefix_caching(True)
    llm.generate([prompt], greedy(2))
    assert llm.generate([prompt], greedy(2))[0].num_cached_tokens == 3 * BLOCK


def test_integrity_names_broken_cache_invariants(make_llm, ckpt: str) -> None:
    llm = make_llm(ckpt, chunk_size=4096)
    engine, kv = llm.engine, llm.engine.kv
    prompt = ids(4 * BLOCK)
    llm.generate([prompt], greedy(2))
    engine.add_request([*prompt, 7], greedy(30))
    engine.step()
    engine.check_integrity()
    pool, held = engine.pool, engine.arena.held
    chunk = next(iter(held.values()))
    pool.retain([chunk])
    with pytest.raises(IntegrityError, match="references"):
        engine.check_integrity()
    pool.release([chunk])
    kv.books.pin([next(iter(held))], +1)
    with pytest.raises(IntegrityError, match="pins differ"):
        engine.check_integrity()
    kv.books.pin([next(iter(held))], -1)
    cid, moved = held.popitem()
    with pytest.raises(IntegrityError, match="holds other chunks"):
        engine.check_integrity()
    held[cid] = moved
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
    for rid in list(engine.requests):
        engine.pop(rid)
