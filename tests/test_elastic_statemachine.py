"""The unified pool under random sequences of steps: the real scheduler, KV manager
(with the prefix cache) and planner, a fake model (tokens drawn at random), random
prefill sizes, decodes, finishes and aborts. Torch-free.

After every step: workspace + KV committed <= the budget, the KV manager's books
hold, and every request added is waiting, running or finished (none lost). At the end
every request that was not aborted has produced all its tokens."""

from __future__ import annotations

import random

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.test_scheduler import launch
from vtensor.engine.elastic import ElasticMemory
from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request
from vtensor.engine.scheduler import Scheduler, SchedulerConfig
from vtensor.kvcache.elastic_planner import ElasticPlanner
from vtensor.kvcache.manager import KVCacheManager, KVGeometry
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.kvcache.workspace_table import WorkspaceTable, doubling_points

CHUNK = 4096
BPT = 512  # KV bytes per token: 8 tokens per chunk
SEQS = 6
MAX_TOKENS = 256  # a slot


class ElasticMachine(RuleBasedStateMachine):
    @initialize(
        budget=st.integers(24, 160),
        per_token=st.sampled_from([CHUNK // 8, CHUNK // 2, CHUNK, 2 * CHUNK]),
        step_tokens=st.sampled_from([8, 16, 32]),
        caching=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def setup(
        self, budget: int, per_token: int, step_tokens: int, caching: bool, seed: int
    ) -> None:
        points = [(n, n * per_token + 2 * CHUNK) for n in doubling_points(step_tokens)]
        tab = WorkspaceTable.monotone(points, CHUNK, "estimated")
        budget = max(budget, tab.chunks_for(step_tokens) + 8)  # the static split leaves KV
        geo = KVGeometry(SEQS + 2, MAX_TOKENS, BPT, CHUNK, budget)
        cache = RadixPrefixCache(*geo.cache_block()) if caching else None
        kv = KVCacheManager(geo, prefix_cache=cache, keep_idle_chunks=budget)
        planner = ElasticPlanner(tab, BPT)
        self.memory = ElasticMemory(planner, budget)
        kv.capacity.set_limit(self.memory.kv_capacity)
        self.sched = Scheduler(SchedulerConfig(SEQS, step_tokens, 2), kv, memory=self.memory)
        # The longest request the pool can ever run: its KV beside one token's workspace.
        room = budget - tab.chunks_for(1) - planner.growth(1, 1) - 1
        self.max_len = min(MAX_TOKENS, room * CHUNK // BPT)
        self.rng = random.Random(seed)
        self.reqs: dict[int, Request] = {}
        self.aborted: set[int] = set()
        self.preempted = 0

    @rule(prompt=st.integers(1, 120), new=st.integers(1, 40), shared=st.booleans())
    def add(self, prompt: int, new: int, shared: bool) -> None:
        total = min(prompt + new, self.max_len)
        prompt = max(1, min(prompt, total - 1))
        if total - prompt < 1:
            return
        ids = [7] * prompt if shared else [self.rng.randrange(100) for _ in range(prompt)]
        params = SamplingParams(max_tokens=total - prompt, temperature=0, ignore_eos=True)
        rid = len(self.reqs)
        self.reqs[rid] = req = Request.new(rid, ids, params, total, 0.0)
        self.sched.add(req)

    @rule()
    def step(self) -> None:
        before = self.memory.counters.deflates
        out = launch(self.sched)
        if self.memory.counters.deflates > before:
            event("deflated")
        c = self.memory.counters
        if c.deflate_cached_chunks:
            event("deflation evicted cached KV")
        self.preempted += len(out.preempted)
        if out.preempted:
            event("preempted")
        if self.memory.kv_capacity > self.memory.static_kv_capacity:
            event("KV borrowed from the workspace")
        for sp in out.spans:
            if sp.samples:
                sp.req.append_output(sp.end, self.rng.randrange(100), None, 0.0)
                if sp.req.num_output >= (sp.req.params.max_tokens or 0):
                    self.sched.remove(sp.req)
                    sp.req.finish("length")

    @precondition(lambda self: any(not r.finished for r in self.reqs.values()))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = sorted(r for r, q in self.reqs.items() if not q.finished)
        rid = data.draw(st.sampled_from(live))
        self.sched.remove(self.reqs[rid])
        self.reqs[rid].finish("abort")
        self.aborted.add(rid)

    @invariant()
    def one_budget(self) -> None:
        if not hasattr(self, "memory"):
            return
        kv = self.sched.kv
        assert self.memory.workspace + kv.books.committed <= self.memory.budget
        assert kv.capacity_chunks == self.memory.kv_capacity
        kv.check()
        s = self.sched
        queued = {r.rid for r in [*s.waiting, *s.running, *s.swapped]}
        done = {r for r, q in self.reqs.items() if q.finished}
        assert queued | done == set(self.reqs) and not queued & done  # none lost

    def teardown(self) -> None:
        if not hasattr(self, "memory"):
            return
        for _ in range(5000):
            if not self.sched.has_unfinished():
                break
            self.step()
            self.one_budget()
        assert not self.sched.has_unfinished(), "a request never finished"
        for rid, req in self.reqs.items():
            if rid not in self.aborted:
                assert req.num_output == req.params.max_tokens


ElasticMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestElasticMachine = ElasticMachine.TestCase
