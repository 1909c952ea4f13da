"""LLMEngine.check_integrity: it passes through a real run (every step, async, with
preemption) and names each invariant that a deliberately corrupted state breaks."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams
from vtensor.engine.integrity import IntegrityError


@contextmanager
def broken(break_it: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """Apply a corruption (which returns its undo) for the duration of the block."""
    undo = break_it()
    try:
        yield
    finally:
        undo()


def _set(obj: object, name: str, value: object) -> Callable[[], None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def test_check_integrity_names_each_broken_invariant(make_llm) -> None:
    # A small pool (1 KiB/token, 4 tokens/chunk) so that requests preempt each other.
    llm = make_llm(chunk_size=4096, kv_cache_bytes=24 * 4096, max_num_seqs=4,
                   async_scheduling=True, debug_check_every=1)  # fmt: skip
    engine = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rids = [g[0] for g in engine.add_requests(random_prompts(4, 400, lo=8, hi=20), params)]
    for _ in range(4):
        engine.step()  # each step checks itself (debug_check_every=1)
    running = engine.scheduler.running
    a, b = running[0], running[1]
    kv, pool = engine.kv, engine.pool
    shared_slot = {**kv.slots.owners(), b.rid: kv.slots.slot_of(a.rid)}
    other_prompt = [a.token_ids[0] ^ 1, *a.token_ids[1:]]

    def extra_reference() -> Callable[[], None]:
        held = [next(c for cid, c in pool._chunks.items() if pool.refcount(c))]
        pool.retain(held)
        return lambda: pool.release(held)

    def books_ahead_of_pool() -> Callable[[], None]:
        return _set(kv, "_applied_committed", kv.committed_applied + 1)

    corruptions = {
        "computed": lambda: _set(a, "num_computed", len(a.token_ids) + 1),
        "unread tokens": lambda: _set(a, "num_output_placeholders", 2),
        "owned by two requests": lambda: _set(kv.slots, "_owner", shared_slot),
        "in the running queue": lambda: _set(b, "status", type(b.status).WAITING),
        "in no queue": lambda: _set(engine.scheduler, "running", [a]),
        "do not start with the prompt": lambda: _set(a, "token_ids", other_prompt),
        "live chunks, committed": lambda: _set(kv.books, "committed", kv.books.committed + 1),
        "references to chunks": extra_reference,
        "the books say": books_ahead_of_pool,
    }
    for message, corrupt in corruptions.items():
        with broken(corrupt), pytest.raises(IntegrityError, match=re.escape(message)):
            engine.check_integrity()
        engine.check_integrity()  # undone: consistent again
    # The debug flag finds a corruption at the end of the next step.
    with broken(extra_reference), pytest.raises(IntegrityError, match="references to chunks"):
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().preemptions > 0  # the checks held through preemption too
    for rid in rids:
        engine.pop(rid)
