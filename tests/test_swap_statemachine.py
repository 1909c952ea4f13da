"""The two KV tiers under random sequences: the prefix-cache machine's admit / grow /
offer / release / premap / evict / reset, plus swap-out (begin: host slots reserved,
the copy in flight; end: copied, GPU chunks unmapped), swap-in (begin: fresh chunks
mapped at the same indices, the copy in flight; end: copied back) and abort in every
one of those states. Real arena on a host pool, real copies (``KVSwapper``).

After every step: every chunk of a swapped request is in exactly one place (its
private tail on the host and unmapped on the GPU, or, in flight, still mapped on the
GPU with its host slots reserved), the host tier's and the pool's books balance, and
a swapped-in request reads back exactly the KV stamps it had.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from tests.test_prefix_statemachine import ManagerMachine
from vtensor.engine.swap import KVSwapper
from vtensor.kvcache.host_tier import HostExtent, SlotHostTier, SwapState
from vtensor.kvcache.swap_chunks import private_tail, swap_in, swap_out

HOST_SLOTS = 10


class SwapMachine(ManagerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tier = SlotHostTier(HOST_SLOTS)
        self.swapper = KVSwapper(self.arena, HOST_SLOTS, torch.device("cpu"))
        self.swapping: dict[int, dict[str, Any]] = {}  # rid -> request, out of self.reqs

    def _pick(self, data: st.DataObject, state: SwapState) -> int | None:
        rids = sorted(r for r in self.swapping if self._ext(r).state is state)
        return data.draw(st.sampled_from(rids)) if rids else None

    def _has(self, state: SwapState) -> bool:
        return any(self._ext(r).state is state for r in self.swapping)

    def _ext(self, rid: int) -> HostExtent:
        ext = self.tier.extent(rid)
        assert ext is not None
        return ext

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def swap_out_begin(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs[rid]
        self.kv.cache_tokens(rid, req["tokens"], req["computed"])  # as a preemption does
        first, end = private_tail(self.kv, rid, req["computed"])
        if self.tier.begin_out(rid, first, end - first) is None:
            event("host tier full: the request would be recomputed")
            return
        event(f"swap-out of {min(end - first, 3)}+ chunks, {min(first, 1)}+ cached kept")
        self.swapping[rid] = self.reqs.pop(rid)

    @precondition(lambda self: self._has(SwapState.COPYING_OUT))
    @rule(data=st.data())
    def swap_out_end(self, data: st.DataObject) -> None:
        rid = self._pick(data, SwapState.COPYING_OUT)
        if rid is None:
            return
        ext = self._ext(rid)
        self.swapper.copy_out(self.kv.slots.slot_of(rid), ext)  # before the unmap is applied
        self.tier.end_out(rid)
        swap_out(self.kv, rid, ext.first)
        self._apply()

    @precondition(lambda self: self._has(SwapState.HOST))
    @rule(data=st.data())
    def swap_in_begin(self, data: st.DataObject) -> None:
        rid = self._pick(data, SwapState.HOST)
        if rid is None:
            return
        if not swap_in(self.kv, rid, self.swapping[rid]["computed"]):
            event("swap-in refused: no room in the pool")
            return
        self.tier.begin_in(rid)
        self._apply()

    @precondition(lambda self: self._has(SwapState.COPYING_IN))
    @rule(data=st.data())
    def swap_in_end(self, data: st.DataObject) -> None:
        rid = self._pick(data, SwapState.COPYING_IN)
        if rid is None:
            return
        self.swapper.copy_in(self.kv.slots.slot_of(rid), self._ext(rid))
        self.tier.end_in(rid)
        self.reqs[rid] = self.swapping.pop(rid)
        self._check_stamps(rid, self.reqs[rid]["computed"])  # the same KV as before
        event("swapped back in")

    @precondition(lambda self: self.swapping)
    @rule(data=st.data())
    def abort_swapped(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.swapping)))
        event(f"abort while {self._ext(rid).state.value}")
        self.tier.drop(rid)
        self.kv.release(rid)
        del self.swapping[rid]

    @rule()
    def reset(self) -> None:  # swapped requests keep their slots: a reset is refused
        assert self.kv.reset_prefix_cache() == (not self.reqs and not self.swapping)

    @invariant()
    def each_chunk_in_one_place(self) -> None:
        assert not self.tier.violations(), self.tier.violations()
        used = 0
        for rid, req in self.swapping.items():
            ext = self._ext(rid)
            used += ext.count
            end = self.kv.geometry.chunks_for(req["computed"])
            assert ext.first + ext.count == end
            mapped = self.kv.mapped_chunks(rid)
            if ext.state is SwapState.HOST:
                assert mapped == ext.first, "a swapped chunk is also on the GPU"
            else:  # in flight: the GPU side stays mapped until the copy is done
                assert mapped >= end
        assert self.tier.usage().used_slots == used
        assert self.tier.usage().requests == len(self.swapping)

    def teardown(self) -> None:
        for rid in list(self.swapping):
            self.tier.drop(rid)
            self.kv.release(rid)
        assert self.tier.usage().used_slots == 0
        self.swapper.close()
        assert self.swapper.host.stats().live_bytes == 0
        super().teardown()


SwapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestSwapMachine = SwapMachine.TestCase
