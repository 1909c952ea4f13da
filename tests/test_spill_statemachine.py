"""Prefix-cache spill under random sequences: the prefix-cache machine's admit / grow /
offer / release / premap / evict / reset, over a cache whose evicted blocks spill to
a host tier, with restores (an admission whose hit reaches host blocks), host
eviction for room (a stand-in swap-out reserving tier slots first: swap takes
precedence), and the copies made by the engine's own ``SpillCopier`` (staging range,
commands applied in segments) on a real arena over a host pool.

After every step: the pool balances and every chunk's references are its mappings
plus one if the cache holds it (the staging range maps nothing); the tier balances;
every block is in exactly one place (GPU chunks, or a settled host extent; no copy is
in flight once the step's copies ran); the tier's spill keys are the cache's host
blocks. An admission that restores host blocks reads, through its slot, exactly the
stamps of its prefix: the spilled KV came back intact.
"""

from __future__ import annotations

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from tests.test_prefix_statemachine import TPC, ManagerMachine
from vtensor.engine.spill import SpillCopier
from vtensor.engine.swap import KVSwapper
from vtensor.kvcache.host_tier import SlotHostTier, SwapState
from vtensor.kvcache.radix_spill import SpillRadixCache

HOST_SLOTS = 6
SWAP_KEY = 1 << 20  # stand-in swapped requests' keys (>= 0, like request ids)


class SpillMachine(ManagerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tier = SlotHostTier(HOST_SLOTS)
        self.cache = SpillRadixCache(*self.arena.geometry.cache_block(), self.tier)
        self.kv.set_prefix_cache(self.cache)
        self.swapper = KVSwapper(self.arena, HOST_SLOTS, torch.device("cpu"))
        self.copier = SpillCopier(self.arena, self.swapper, self.tier, stage_chunks=2)
        self.swap_keys: list[int] = []

    def _apply(self) -> None:
        """What the engine does with a step's plan: spill copies before their drops,
        then the commands, then the restores' copies in."""
        commands, spills = self.kv.take_commands(), self.kv.take_spills()
        segments = self.copier.plan(commands, [], spills)
        for part, hook in segments[0] if segments else [(commands, None)]:
            self.arena.apply(part)
            if hook is not None:
                hook()
        self.arena.wait_all()
        restores = self.kv.take_restores()
        if restores:
            event(f"restored {min(len(restores), 2)}+ host blocks")
        self.copier.copy_in(restores)

    @rule(ids=st.sampled_from([0, 1, 2]), part=st.integers(1, 40))
    def readmit_base(self, ids: int, part: int) -> None:
        """A whole base conversation again: the likeliest to reach spilled blocks."""
        from tests.test_prefix_statemachine import BASES

        restored = self.cache.stats().restored_blocks
        self.admit(BASES[ids][: 40 + ids], part)
        if self.cache.stats().restored_blocks > restored:
            event("a readmitted conversation restored host blocks")

    @rule(n=st.integers(1, HOST_SLOTS))
    def swap_reserve(self, n: int) -> None:
        """A swap-out needing ``n`` host slots: spilled blocks make room for it."""
        usage = self.tier.usage()
        if usage.capacity_slots - usage.used_slots < n:
            dropped = self.cache.stats().host_dropped_blocks
            self.kv.cache.free_host(n)
            if self.cache.stats().host_dropped_blocks > dropped:
                event("a swap-out dropped spilled blocks for room")
        key = SWAP_KEY + len(self.swap_keys) + 1000 * n
        while key in self.swap_keys:
            key += 1
        if self.tier.begin_out(key, 0, n) is not None:
            self.tier.end_out(key)
            self.swap_keys.append(key)

    @precondition(lambda self: self.swap_keys)
    @rule(data=st.data())
    def swap_release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.swap_keys))
        self.swap_keys.remove(key)
        self.tier.drop(key)

    @invariant()
    def tiers_balance(self) -> None:
        self._apply()
        assert not self.tier.violations()
        assert self.copier.stage.mapped_chunks == 0
        spill_keys = [k for k in self.tier.held_keys() if k < 0]
        for k in spill_keys:
            ext = self.tier.extent(k)
            assert ext is not None and ext.state is SwapState.HOST, "a copy still in flight"
        s = self.cache.stats()
        assert len(spill_keys) == s.host_blocks
        assert self.tier.usage().spill_slots == s.host_blocks * self.cache.block_chunks
        assert sorted(self.swap_keys) == sorted(k for k in self.tier.held_keys() if k >= 0)
        if s.host_blocks:
            event("blocks on the host")

    def teardown(self) -> None:
        for key in self.swap_keys:
            self.tier.drop(key)
        for rid in list(self.reqs):
            self.kv.release(rid)
        self.reqs.clear()
        assert self.kv.reset_prefix_cache()
        self._apply()
        assert self.tier.usage().used_slots == 0
        self.copier.close()
        self.swapper.close()
        super().teardown()


assert TPC == 8  # one token block per chunk: a spilled block is one host slot
SpillMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestSpillMachine = SpillMachine.TestCase
