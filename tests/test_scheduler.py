"""Scheduler + KV manager on the CPU, with no model: tokens are drawn at random.

These tests import no torch on purpose: the scheduler and the KV bookkeeping
must be testable (and usable) without it. The scheduler only plans; like
``LLMEngine``, the helpers below apply its plans to the requests.
"""

from __future__ import annotations

import random
import subprocess
import sys

from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request, RequestStatus
from vtensor.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from vtensor.kvcache.manager import KVCacheManager, KVGeometry

TPC = 8  # tokens per chunk below


def make(capacity: int = 64, slots: int = 8, budget: int = 64, lookahead: int = 0) -> Scheduler:
    geo = KVGeometry(slots, 256, 512, 4096, capacity)
    return Scheduler(SchedulerConfig(slots, budget, lookahead), KVCacheManager(geo))


def request(rid: int, prompt_len: int, max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request.new(rid, [1] * prompt_len, params, prompt_len + max_tokens, 0.0)


def launch(s: Scheduler) -> SchedulerOutput:
    """Schedule and apply the plan to the requests, as ``StepLoop.launch`` does."""
    out = s.schedule()
    for q in out.preempted:
        q.preempt()
    for a in out.admitted:
        a.req.admit(a.num_cached)
    for sp in out.spans:
        sp.req.advance(sp.end, sp.samples)
    return out


def finish(s: Scheduler, q: Request, reason: str) -> None:
    s.remove(q)
    q.finish(reason)


def run_step(s: Scheduler, rng: random.Random) -> SchedulerOutput:
    """One synchronous step with a fake model; finishes requests at max_tokens."""
    out = launch(s)
    for sp in out.spans:
        if sp.samples:
            sp.req.append_output(sp.end, rng.randrange(100), None, 0.0)
            if sp.req.num_output >= (sp.req.params.max_tokens or 0):
                finish(s, sp.req, "length")
    s.kv.check()
    return out


def test_scheduler_imports_no_torch() -> None:
    modules = ", ".join(
        f"vtensor.{m}"
        for m in ("engine.scheduler", "engine.request", "engine.params", "engine.stop",
                  "engine.output_processor", "engine.input_processor", "kvcache.manager",
                  "kvcache.prefix_cache", "kvcache.radix_cache", "kvcache.radix_spill",
                  "kvcache.chunk_books", "kvcache.cache_links",
                  "kvcache.reclaim", "kvcache.manager_checks", "kvcache.commands",
                  "kvcache.geometry", "kvcache.idle_policy", "kvcache.idle_reclaim",
                  "kvcache.write_guard", "kvcache.usage", "intervals",
                  "kvcache.shared_budget", "kvcache.host_tier", "kvcache.swap_policy",
                  "kvcache.swap_chunks", "engine.swap_plan", "engine.scheduler_output",
                  "engine.admission_policy", "engine.slo_policy", "engine.slo_admission",
                  "engine.swapped_queue", "engine.map_ahead", "engine.scheduler_config",
                  "kvcache.slot_owners", "kvcache.capacity")
    )  # fmt: skip
    code = f"import sys, {modules}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_splits_a_prompt_and_samples_once() -> None:
    s, rng = make(budget=32), random.Random()
    s.add(request(0, 100, 2))
    sizes, samples = [], []
    for _ in range(4):
        out = run_step(s, rng)
        sizes.append(out.spans[0].num_tokens)
        samples.append(out.spans[0].samples)
    assert sizes == [32, 32, 32, 4] and samples == [False, False, False, True]


def test_mixed_batch_holds_decodes_and_a_prefill_span() -> None:
    s, rng = make(budget=16), random.Random()
    s.add(request(0, 5, 10))
    run_step(s, rng)  # prefill of request 0
    s.add(request(1, 40, 4))
    out = run_step(s, rng)
    kinds = [(sp.req.rid, sp.num_tokens) for sp in out.spans]
    assert kinds == [(0, 1), (1, 15)]  # request 0 decodes, request 1 prefills within budget
    assert not out.is_decode and out.num_tokens == 16


def test_admission_waits_for_free_chunks() -> None:
    s, rng = make(capacity=6), random.Random()  # 48 tokens of KV
    s.add(request(0, 30, 4))  # 4 chunks (+1 headroom) fit
    s.add(request(1, 30, 4))  # would need 4 more: must wait
    out = run_step(s, rng)
    assert [sp.req.rid for sp in out.spans] == [0] and s.waiting[0].rid == 1
    while s.running:
        run_step(s, rng)
    out = run_step(s, rng)
    assert [sp.req.rid for sp in out.spans] == [1]


def test_exhausted_pool_preempts_the_newest_and_recomputes_it() -> None:
    s, rng = make(capacity=8, budget=64), random.Random()
    a, b = request(0, 20, 40), request(1, 20, 40)  # each grows from 3 to 8 chunks: both cannot
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(300):
        if not s.has_unfinished():
            break
        out = run_step(s, rng)
        preempted += [p.rid for p in out.preempted]
        if b.num_preemptions == 1 and b.status is RequestStatus.WAITING:
            kept = b.output_ids
            assert b.num_computed == 0 and kept  # output so far is kept, KV recomputed
    assert preempted and set(preempted) == {1}  # the newest, never the oldest
    assert a.num_output == 40 and b.num_output == 40
    assert s.num_preemptions == len(preempted)


def test_random_workload_finishes_every_request_and_returns_every_chunk() -> None:
    rng = random.Random()
    s = make(capacity=rng.randint(40, 80), slots=rng.randint(2, 8), budget=rng.randint(8, 64))
    s.config = SchedulerConfig(s.config.max_num_seqs, s.config.max_num_batched_tokens, 4)
    reqs = [request(i, rng.randint(1, 120), rng.randint(1, 60)) for i in range(60)]
    pending = list(reqs)
    for _ in range(20_000):
        if pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        if not pending and not s.has_unfinished():
            break
        run_step(s, rng)
    assert all(q.status is RequestStatus.FINISHED for q in reqs)
    assert all(q.num_output == q.params.max_tokens for q in reqs)
    usage = s.kv.usage()
    assert usage.running_slots == 0 and usage.committed_chunks == usage.idle_chunks
    s.kv.reclaim_all()
    assert s.kv.usage().committed_chunks == 0
    s.kv.check()


def test_async_workload_reads_tokens_a_step_late_and_returns_every_chunk() -> None:
    """The engine's async loop with a fake model: each step is launched before the
    previous one's tokens are read; requests stop at random (EOS-like) or on length,
    and some are aborted with a token in flight."""
    rng = random.Random()
    s = make(capacity=rng.randint(40, 80), slots=rng.randint(2, 8), budget=rng.randint(8, 64))
    reqs = [request(i, rng.randint(1, 120), rng.randint(1, 60)) for i in range(60)]
    stops = {q.rid: rng.randint(1, 80) for q in reqs}  # an "EOS" at this output length
    pending, inflight = list(reqs), []
    for _ in range(20_000):
        if pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        out = launch(s)
        read_late(s, inflight, stops, rng)
        inflight = [sp for sp in out.spans if sp.samples]
        s.kv.check()
        if not pending and not s.has_unfinished() and not inflight:
            break
    assert all(q.status is RequestStatus.FINISHED for q in reqs)
    assert all(q.num_output_placeholders == 0 for q in reqs)
    for q in reqs:
        if q.finish_reason != "abort":
            want = min(q.params.max_tokens or 0, stops[q.rid])
            assert q.num_output == want, (q.rid, q.num_output, want, q.finish_reason)
    s.kv.reclaim_all()
    assert s.kv.usage().committed_chunks == 0


def read_late(s: Scheduler, spans: list, stops: dict[int, int], rng: random.Random) -> None:
    """Read a launched step's tokens, then stop or abort (StepLoop.apply_outputs)."""
    for sp in spans:
        q = sp.req
        if q.finished:
            continue  # stopped or aborted after this launch: the token is dropped
        q.append_output(sp.end, rng.randrange(100), None, 0.0)
        n_out = q.num_output
        if n_out >= min(q.params.max_tokens or 0, stops[q.rid]):
            reason = "stop" if n_out >= stops[q.rid] else "length"
        elif rng.random() < 0.01:
            reason = "abort"
        else:
            continue
        finish(s, q, reason)  # drops the token launched after this one, if any


def test_next_admissions_are_mapped_a_step_early() -> None:
    """A prompt that waits for budget gets its slot mapped during the step before its
    admission, so the admitting step's own commands map nothing for it."""
    from vtensor.kvcache.manager import MapCommand

    rng = random.Random()
    first, second = rng.randint(20, 40), rng.randint(9, 40)
    s = make(budget=first)  # the first prompt takes the whole budget of step 1
    s.add(request(0, first, 4))
    s.add(request(1, second, 4))
    out1 = launch(s)
    assert [sp.req.rid for sp in out1.spans] == [0]
    premapped = [c for c in out1.ahead_commands if isinstance(c, MapCommand)]
    # The next step's budget bounds what the second request can compute, and so the premap.
    assert sum(c.count for c in premapped) == -(-min(second, first) // TPC)
    for sp in out1.spans:
        if sp.samples:
            sp.req.append_output(sp.end, rng.randrange(100), None, 0.0)
    out2 = s.schedule()
    assert [sp.req.rid for sp in out2.spans] == [0, 1]
    slot = s.kv.slots.slot_of(1)
    assert not [c for c in out2.kv_commands if isinstance(c, MapCommand) and c.slot == slot]
    assert s.kv.mapped_chunks(1) >= -(-out2.spans[1].end // TPC)
    s.kv.check()


def test_premap_uses_only_free_chunks_beyond_the_headroom() -> None:
    s = make(capacity=6)
    s.kv.premap([5 * TPC], headroom_chunks=2)  # needs 5, only 4 spare: nothing mapped
    assert s.kv.usage().committed_chunks == 0 and not s.kv.take_commands()
    s.kv.premap([3 * TPC, 3 * TPC], headroom_chunks=0)  # two slots of 3 chunks each
    assert s.kv.usage().committed_chunks == 6 and s.kv.usage().idle_chunks == 6
    s.kv.check()
