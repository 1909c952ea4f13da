"""Prefix caching under tensor parallelism on the CPU: gloo, two processes, fp32.

Rank 0's books alone decide what is cached; each worker applies the same KV
commands (fresh maps, unmaps, the cache's holds, shared maps of held chunks and
drops) to its own arena and pool. The reference is the engine without either
feature: one process, prefix caching off. Greedy tokens must be identical, the
cache must really serve prompt tokens, and every rank's arena must share its
chunks exactly as rank 0's does (``check_integrity`` compares the ranks' chunk
signatures after every step); after a reset every rank's pool holds only the
scratch chunks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.test_prefix_engine import chat_rounds, greedy, ids
from vtensor.engine.integrity import worker_problems
from vtensor.engine.tp_worker import ArenaReport
from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.commands import CacheHoldCommand, MapCachedCommand, MapCommand
from vtensor.kvcache.layout import KVLayout
from vtensor.memory import ChunkPool, open_backend

CHUNK = 4096  # 2 layers x 1 KV head (of 2, split) x 16 dims x K,V x fp32: 16 tokens


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    make_checkpoint(tmp_path, "llama", num_key_value_heads=2)  # one KV head per rank
    return str(tmp_path)


def engines(make_llm: Any, ckpt: str, **kw: Any) -> tuple[Any, Any]:
    """TP=2 with the prefix cache (every rank checked every step), TP=1 without it."""
    tp = make_llm(ckpt, tensor_parallel_size=2, enable_prefix_caching=True, chunk_size=CHUNK,
                  debug_check_every=1, **kw)  # fmt: skip
    ref_kw = {k: v for k, v in kw.items() if k != "kv_cache_bytes"}  # room: no preemption
    ref = make_llm(ckpt, enable_prefix_caching=False, chunk_size=CHUNK, **ref_kw)
    assert tp.engine.workers is not None and tp.engine.kv.cache.enabled
    assert not ref.engine.kv.cache.enabled
    return tp, ref


def reports(llm: Any) -> list[ArenaReport]:
    engine = llm.engine
    return engine.workers.reports(engine.parts)


def assert_ranks_clean_after_reset(llm: Any) -> None:
    """Reset the cache (it also unmaps idle slots): on every rank only the scratch
    slot's chunks stay in use, with one reference each, and nothing is held."""
    engine = llm.engine
    assert engine.reset_prefix_cache()
    scratch = engine.kv.geometry.chunks_for(1)
    for r in reports(llm):
        assert (r.pool_in_use, r.pool_references) == (scratch, scratch), r.rank
        assert not r.signature.held and len(r.mapped) == scratch


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_tp2_cached_multi_turn_equals_tp1_uncached(make_llm, ckpt: str, overlap: bool) -> None:
    tp, ref = engines(make_llm, ckpt, async_scheduling=overlap, max_num_batched_tokens=48)
    block = tp.engine.kv.cache.block_tokens
    assert block == 16 and tp.engine.arena.layout.num_kv_heads == 1
    # A shared system prompt longer than a step's budget: the first conversation's
    # blocks are cached while later ones are admitted, so they map them shared (other
    # slots); later rounds hit their own history in the slot that served them.
    system = ids(3 * block + 5)
    questions = [[ids(random.randint(8, 30)) for _ in range(3)] for _ in range(3)]
    for q in questions:
        q[0] = system + q[0]
    a, b = chat_rounds(tp, questions, greedy(10)), chat_rounds(ref, questions, greedy(10))
    for r, (xs, ys) in enumerate(zip(a, b)):
        assert [x.outputs[0].token_ids for x in xs] == [y.outputs[0].token_ids for y in ys]
        for x, q in zip(xs, questions):
            if r == 0:
                assert x.num_cached_tokens in (0, 3 * block)
                continue
            history = len(x.prompt_token_ids) - len(q[r]) - 1
            assert x.num_cached_tokens == history // block * block, (r, history)
    assert sum(x.num_cached_tokens for x in a[0]) > 0  # the system prompt, shared
    stats = tp.engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_chunks > 0
    rank0, worker = reports(tp)
    # The worker holds what rank 0's cache holds, each chunk also mapped by an idle slot.
    assert worker.signature == rank0.signature and worker.signature.held
    assert max(worker.signature.references) >= 2
    assert_ranks_clean_after_reset(tp)


def test_tp2_shared_prompt_eviction_preemption_and_n_equal_tp1(make_llm, ckpt: str) -> None:
    """A shared system prompt over a pool too small for the batch: every rank evicts the
    same LRU blocks, preempts alike and maps the same hits; n > 1 shares the prompt."""
    tp, ref = engines(make_llm, ckpt, kv_cache_bytes=14 * CHUNK, max_num_seqs=4)
    system = ids(3 * 16 + 5)
    prompts = [system + ids(random.randint(3, 12)) for _ in range(5)]
    x, y = tp.generate(prompts, greedy(40)), ref.generate(prompts, greedy(40))
    assert [o.outputs[0].token_ids for o in x] == [o.outputs[0].token_ids for o in y]
    stats = tp.engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_evicted_chunks > 0
    assert stats.prefix_cache_hits >= 3 * 16
    rank0, worker = reports(tp)
    assert worker.signature == rank0.signature
    assert_ranks_clean_after_reset(tp)
    tp.generate([system + ids(4)], greedy(1))  # the system prompt's 3 blocks, cached
    one = system + ids(10)
    x1, y1 = tp.generate([one], greedy(6, n=3))[0], ref.generate([one], greedy(6, n=3))[0]
    assert [c.token_ids for c in x1.outputs] == [c.token_ids for c in y1.outputs]
    assert x1.num_cached_tokens == 3 * 16  # every sample mapped the same 3 cached blocks
    assert_ranks_clean_after_reset(tp)


def _arena(pool: ChunkPool) -> KVArena:
    # 1 layer x 1 head x 16 dims x K,V x fp32 = 128 B per token: 32 tokens a chunk.
    return KVArena(KVLayout(3, 128, 1, 1, 16, torch.float32), pool, torch.device("cpu"))


def _report(rank: int, arena: KVArena) -> ArenaReport:
    arena.wait_all()
    s = arena.pool.stats()
    return ArenaReport(rank, arena.vt.mapped_indices(), s.in_use, s.references, arena.signature())


def test_the_rank_check_sees_sharing_that_differs() -> None:
    """Two arenas with the same commands have equal signatures, whatever physical chunks
    their pools gave. A rank that mapped fresh chunks where rank 0 shared cached ones
    maps the same indices (and as many references), yet the check names it."""
    backend = open_backend("host", chunk_size=CHUNK)
    pools = [ChunkPool(backend, 32 * CHUNK) for _ in range(3)]
    arenas = [_arena(p) for p in pools]
    try:
        spare = pools[1].acquire(random.randint(1, 5))  # other physical chunks on rank 1
        pools[1].release(spare)
        fill = [MapCommand(1, 0, 3), CacheHoldCommand(1, 0, (10, 11, 12))]
        share = [MapCachedCommand(2, 0, (10, 11))]
        for arena in arenas:
            arena.apply(fill)
        arenas[0].apply(share)
        arenas[1].apply(share)
        arenas[2].apply([MapCommand(2, 0, 2)])  # a rank that missed the share
        ours, same, other = (_report(r, a) for r, a in enumerate(arenas))
        assert same.signature == ours.signature and worker_problems([ours, same]) == []
        assert other.mapped == ours.mapped
        problems = worker_problems([ours, other])
        assert any("shares chunks otherwise" in p for p in problems), problems
        assert any("reference counts differ" in p for p in problems), problems
    finally:
        for arena in arenas:
            arena.close()
        for pool in pools:
            pool.close()
        backend.close()
