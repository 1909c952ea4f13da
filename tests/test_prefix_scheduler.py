"""The scheduler with the prefix cache and a fake model (no torch): hits, preemption
that keeps the prefix cached, and random sync and async workloads with shared
prefixes that finish every request, check the books every step and give every
chunk back after a reset."""

from __future__ import annotations

import random

from tests.test_scheduler import TPC, launch, read_late, run_step
from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request, RequestStatus
from vtensor.engine.scheduler import Scheduler, SchedulerConfig
from vtensor.kvcache.manager import KVCacheManager, KVGeometry, MapCommand
from vtensor.kvcache.radix_cache import RadixPrefixCache


def make(capacity: int = 64, slots: int = 8, budget: int = 64, lookahead: int = 0) -> Scheduler:
    geo = KVGeometry(slots, 256, 512, 4096, capacity)
    kv = KVCacheManager(geo, prefix_cache=RadixPrefixCache(*geo.cache_block()))
    return Scheduler(SchedulerConfig(slots, budget, lookahead), kv)


def with_prompt(rid: int, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request.new(rid, prompt, params, len(prompt) + max_tokens, 0.0)


def test_a_later_request_starts_after_the_cached_prefix() -> None:
    s, rng = make(), random.Random()
    system = [rng.randrange(100) for _ in range(3 * TPC + 5)]
    s.add(with_prompt(0, [*system, 1, 2], 3))
    while s.has_unfinished():
        run_step(s, rng)
    s.add(with_prompt(1, [*system, 7], 3))
    out = launch(s)
    [admission] = out.admitted
    assert admission.num_cached == 3 * TPC and out.spans[0].start == 3 * TPC
    assert admission.req.num_cached_tokens == 3 * TPC
    assert (s.prefix_queries, s.prefix_hits) == (len(system) + 2 + len(system) + 1, 3 * TPC)


def test_a_preempted_request_leaves_its_computed_blocks_cached() -> None:
    """Everything reclaimable, the old cached blocks included, is taken before anyone
    is preempted; then the victim's blocks are cached, and the step evicts (LRU,
    leaves first) only the one chunk that the surviving request needed."""
    s, rng = make(capacity=12, budget=64), random.Random()
    s.add(with_prompt(9, [rng.randrange(100) for _ in range(4 * TPC)], 1))
    while s.has_unfinished():
        run_step(s, rng)  # 4 old cached blocks
    a, b = (with_prompt(i, [rng.randrange(100) for _ in range(20)], 40) for i in range(2))
    s.add(a)
    s.add(b)  # both grow to 8 chunks: one is preempted
    for _ in range(300):
        out = run_step(s, rng)
        if out.preempted:
            [victim] = out.preempted
            known = len(victim.token_ids)  # all computed but the last (sync steps)
            assert known > 20 and victim.num_computed == 0
            hit = s.kv.match(victim.token_ids, known)
            assert hit.tokens >= (known - 1) // TPC * TPC - TPC and hit.tokens > 20
            assert s.kv.evicted_chunks == 4 + 1
            break
    else:
        raise AssertionError("no preemption")


def test_random_shared_prefix_workloads_finish_and_give_every_chunk_back() -> None:
    rng = random.Random()
    for overlap in (False, True):
        s = make(capacity=rng.randint(30, 80), slots=rng.randint(2, 8), budget=rng.randint(8, 64))
        s.config = SchedulerConfig(s.config.max_num_seqs, s.config.max_num_batched_tokens, 4)
        systems = [[rng.randrange(50) for _ in range(rng.randint(0, 60))] for _ in range(3)]
        questions = [[rng.randrange(50) for _ in range(rng.randint(1, 40))] for _ in range(50)]
        reqs = [
            with_prompt(i, rng.choice(systems) + q, rng.randint(1, 50))
            for i, q in enumerate(questions)
        ]
        stops = {q.rid: rng.randint(1, 80) for q in reqs}
        pending, inflight = list(reqs), []
        for _ in range(20_000):
            if pending and rng.random() < 0.3:
                s.add(pending.pop(0))
            if overlap:
                out = launch(s)
                read_late(s, inflight, stops, rng)
                inflight = [sp for sp in out.spans if sp.samples]
            else:
                run_step(s, rng)
            s.kv.check()
            if not pending and not s.has_unfinished() and not inflight:
                break
        assert all(q.status is RequestStatus.FINISHED for q in reqs)
        assert s.prefix_hits > 0
        assert s.kv.reset_prefix_cache() and s.kv.usage().committed_chunks == 0
        s.kv.check()


def test_with_every_seat_taken_the_next_request_is_mapped_ahead_into_a_spare_slot() -> None:
    """Two seats and two spare slots: while both seats run, the waiting request's
    chunks are mapped ahead (premap) into a spare slot, so the step that admits it
    maps nothing, and the finished requests' slots keep their cached blocks mapped."""
    geo = KVGeometry(4, 256, 512, 4096, 64)  # 2 seats + 2 spare slots
    kv = KVCacheManager(geo, prefix_cache=RadixPrefixCache(*geo.cache_block()))
    s, rng = Scheduler(SchedulerConfig(2, 64, 0), kv), random.Random()
    for rid in range(2):
        s.add(with_prompt(rid, [rng.randrange(100) for _ in range(2 * TPC)], rng.randint(3, 9)))
    nxt = with_prompt(2, [rng.randrange(100) for _ in range(3 * TPC + 1)], 2)
    s.add(nxt)
    premapped = None
    while nxt.status is RequestStatus.WAITING:
        out = run_step(s, rng)
        ahead = [c for c in out.ahead_commands if isinstance(c, MapCommand)]
        if ahead and premapped is None and len(s.running) == 2:
            premapped = ahead[-1].slot
            assert premapped not in {kv.slots.slot_of(r.rid) for r in s.running}
    assert premapped is not None and kv.slots.slot_of(nxt.rid) == premapped
    assert not [c for c in out.kv_commands if isinstance(c, MapCommand)]  # nothing to wait for
    while s.has_unfinished():
        run_step(s, rng)
    kv.check()


def test_a_full_pool_evicts_for_the_next_step_while_this_one_runs() -> None:
    """The cache fills the pool; a running request's next chunks are then freed by
    eviction (least recently used first, as the step itself would) and mapped in the
    commands for later steps, never in the step that writes them."""
    rng = random.Random()
    s = make(capacity=16, slots=4, budget=64, lookahead=4)
    kept = [rng.randrange(100) for _ in range(4 * TPC)]
    prompt, rid = kept, 0
    while s.kv.free_chunks and rid < 20:  # distinct prompts until the cache holds all
        s.add(with_prompt(rid, prompt, 1))
        while s.has_unfinished():
            run_step(s, rng)
        prompt, rid = [rng.randrange(100) for _ in range(TPC + rid % 3 * TPC)], rid + 1
    assert s.kv.free_chunks == 0  # every chunk holds a cached block
    s.add(with_prompt(100, [rng.randrange(100) for _ in range(TPC - 2)], 3 * TPC))
    grew_in_step, evicted = 0, s.kv.evicted_chunks
    admitted = launch(s)  # the prompt's own chunk: mapped in its step, as without a cache
    assert [a.req.rid for a in admitted.admitted] == [100]
    for sp in admitted.spans:
        sp.req.append_output(sp.end, rng.randrange(100), None, 0.0)
    while s.has_unfinished():
        out = run_step(s, rng)
        grew_in_step += sum(c.count for c in out.kv_commands if isinstance(c, MapCommand))
    assert s.kv.evicted_chunks > evicted and grew_in_step == 0
    assert s.kv.match(kept, len(kept) - 1).tokens == 0  # the oldest blocks went first
    s.kv.check()
