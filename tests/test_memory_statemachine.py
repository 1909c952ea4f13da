"""Random sequences of create/map/share/unmap/close against a simple model.

The model is plain dictionaries: which chunk id each (tensor, index) holds.
After every step the pool's accounting and the bytes behind every mapping
(each chunk is stamped with a random value) must agree with it.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from vtensor.memory import (
    ChunkPool,
    ClosedError,
    NotMappedError,
    OutOfRangeError,
    OverlapError,
    PoolExhaustedError,
    VirtualTensor,
    open_backend,
)

CHUNK = 4096  # small host chunks keep thousands of steps fast
CAPACITY = 12
MAX_CHUNKS = 8


class PoolMachine(RuleBasedStateMachine):
    tensors = Bundle("tensors")

    def __init__(self) -> None:
        super().__init__()
        self.backend = open_backend("host", chunk_size=CHUNK)
        self.pool = ChunkPool(self.backend, CAPACITY * CHUNK)
        self.model: dict[int, dict[int, int]] = {}  # id(vt) -> {chunk index: cid}
        self.live: dict[int, VirtualTensor] = {}
        self.stamps: dict[int, int] = {}  # cid -> stamp written through some mapping
        self.order: dict[int, int] = {}  # id(vt) -> creation index
        self.keep_alive: list[VirtualTensor] = []

    # ------------------------------------------------------------------ rules
    @rule(target=tensors, n=st.integers(1, MAX_CHUNKS))
    def create(self, n: int) -> VirtualTensor:
        vt = VirtualTensor(self.pool, n * CHUNK)
        self.live[id(vt)], self.model[id(vt)] = vt, {}
        self.order[id(vt)] = len(self.order)
        self.keep_alive.append(vt)  # so that id() values are never reused
        return vt

    @rule(vt=tensors, start=st.integers(-1, MAX_CHUNKS), length=st.integers(1, 4))
    def map(self, vt: VirtualTensor, start: int, length: int) -> None:
        expected = self._expected_map_error(vt, start, length, fresh=length)
        try:
            vt.map(start * CHUNK, length * CHUNK)
        except (ClosedError, OutOfRangeError, OverlapError, PoolExhaustedError) as exc:
            assert expected is type(exc), (expected, exc)
            return
        assert expected is None, expected
        for i, c in enumerate(vt.chunks(start * CHUNK, length * CHUNK)):
            self.model[id(vt)][start + i] = c.cid
            self.stamps.pop(c.cid, None)  # recycled chunk: old contents are undefined

    @rule(src=tensors, dst=tensors, s=st.integers(0, MAX_CHUNKS), d=st.integers(0, MAX_CHUNKS))
    def share(self, src: VirtualTensor, dst: VirtualTensor, s: int, d: int) -> None:
        if src.closed or s not in self.model[id(src)]:
            return
        chunk = src.chunks(s * CHUNK, CHUNK)
        expected = self._expected_map_error(dst, d, 1, fresh=0)
        try:
            dst.map_chunks(d * CHUNK, chunk)
        except (ClosedError, OutOfRangeError, OverlapError) as exc:
            assert expected is type(exc), (expected, exc)
            return
        assert expected is None, expected
        self.model[id(dst)][d] = chunk[0].cid

    @rule(vt=tensors, start=st.integers(0, MAX_CHUNKS), length=st.integers(1, 3))
    def unmap(self, vt: VirtualTensor, start: int, length: int) -> None:
        held = self.model[id(vt)]
        idx = range(start, start + length)
        try:
            vt.unmap(start * CHUNK, length * CHUNK)
        except ClosedError:
            assert vt.closed
            return
        except OutOfRangeError:
            assert start + length > vt.num_chunks
            return
        except NotMappedError:
            assert not all(i in held for i in idx)
            return
        for i in idx:
            del held[i]

    @rule(vt=consumes(tensors))
    def close(self, vt: VirtualTensor) -> None:
        vt.close()
        del self.live[id(vt)]
        self.model[id(vt)] = {}

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def stamp(self, data: st.DataObject) -> None:
        # Sorted by creation order, not id(): draws must replay deterministically.
        vt = data.draw(
            st.sampled_from([self.live[k] for k in sorted(self.live, key=self.order.get)])
        )
        if not self.model[id(vt)]:
            return
        i = data.draw(st.sampled_from(sorted(self.model[id(vt)])))
        value = data.draw(st.integers(-(2**62), 2**62))
        vt.view(torch.int64, (1,), offset=i * CHUNK).fill_(value)
        self.stamps[self.model[id(vt)][i]] = value

    # ------------------------------------------------------------- invariants
    @invariant()
    def accounting_matches_model(self) -> None:
        s = self.pool.stats()
        refs = Counter(cid for m in self.model.values() for cid in m.values())
        assert s.balanced, s
        assert s.references == sum(refs.values()), (s, refs)
        assert s.in_use == len(refs), (s, refs)
        assert s.shared == sum(1 for r in refs.values() if r > 1)
        assert s.created <= CAPACITY
        for cid, r in refs.items():
            assert self._refcount(cid) == r

    @invariant()
    def every_alias_reads_the_stamp(self) -> None:
        for key, held in self.model.items():
            vt = self.live.get(key)
            for i, cid in held.items():
                if cid in self.stamps and vt is not None:
                    got = int(vt.view(torch.int64, (1,), offset=i * CHUNK).item())
                    assert got == self.stamps[cid], (i, cid)

    def teardown(self) -> None:
        for vt in self.live.values():
            vt.close()
        s = self.pool.stats()
        assert s.balanced and s.in_use == 0, s
        self.pool.close()
        self.backend.close()

    # ---------------------------------------------------------------- helpers
    def _expected_map_error(
        self, vt: VirtualTensor, start: int, length: int, fresh: int
    ) -> type[Exception] | None:
        if vt.closed:
            return ClosedError
        if start < 0 or start + length > vt.num_chunks:
            return OutOfRangeError
        if any(i in self.model[id(vt)] for i in range(start, start + length)):
            return OverlapError
        if fresh > self.pool.stats().available_chunks:
            return PoolExhaustedError
        return None

    def _refcount(self, cid: int) -> int:
        chunk = next(c for c in self.pool._chunks.values() if c.cid == cid)
        return self.pool.refcount(chunk)


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolStateMachine = PoolMachine.TestCase
