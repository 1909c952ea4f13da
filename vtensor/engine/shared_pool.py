"""SharedKVPool: several engines (models) on one KV memory budget.

``pool = SharedKVPool(budget_bytes, device="cuda")`` then ``LLM(a, kv_pool=pool)``
and ``LLM(b, kv_pool=pool)``: the two engines' KV chunks together never exceed
``budget_bytes``, and whichever is busy gets the memory (kvcached's idea of
elastic KV for several models on one GPU).

How (``kvcache/shared_budget.py`` has the invariants): each engine keeps its own
arena, mapper and ``ChunkPool``, and its KV manager draws a *grant* on one
torch-free :class:`SharedKVBudget`. The engine's pool capacity follows its lease
(``fixed`` scratch + grant), so chunks an engine gives back are released to the
driver and the other engine creates fresh ones: the device memory moves, not
the chunks. An engine short of chunks takes, in order: its free chunks, the
unallocated budget, the grant the others do not use, their reclaimable chunks
(when its own do not cover the shortfall), its own reclaimable chunks; only
then does its scheduler preempt.

Threads: :class:`EngineMember` is the engine's side of the contract. The
engine holds its ``books_lock`` whenever it touches its KV books (the parts of a
step around the GPU wait, abort, reclamation, stats); another engine serves
itself from this one only after taking that lock *without blocking*, else it
leaves an ask that this engine serves at its next step.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import torch

from vtensor.kvcache.shared_budget import BudgetMember, BudgetStats, KVLease, SharedKVBudget

from .config import EngineConfig
from .executor import StepPlan
from .input_processor import InputProcessor

if TYPE_CHECKING:
    from .llm_engine import LLMEngine


class SharedKVPool:
    """One KV budget of ``budget_bytes`` on ``device`` for every engine built on it.

    The chunk size is the device's (CUDA) or ``chunk_size`` (host, default: the first
    engine's); every engine must use the same one, or it is refused."""

    def __init__(
        self, budget_bytes: int, device: str | None = None, chunk_size: int | None = None
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = device
        self.chunk_size = chunk_size
        self.budget: SharedKVBudget | None = None
        self._lock = threading.Lock()
        self._device: torch.device | None = None

    def attach(self, engine: LLMEngine, name: str | None = None) -> KVLease:
        """Join the budget with ``engine`` (built with ``kv_cache_bytes=budget_bytes``):
        its scratch chunks are held for good, its pool shrinks to what its lease holds.
        ``name`` names its lease (refused if taken); None: its model's name, made unique
        with ``#2``, ``#3``, ... (the same checkpoint twice)."""
        chunk = engine.pool.chunk_size
        device = engine.runtime.device
        with self._lock:
            if self._device is not None and device != self._device:
                raise ValueError(f"{name!r} is on {device}, the shared KV pool on {self._device}")
            if self.chunk_size is not None and chunk != self.chunk_size:
                raise ValueError(
                    f"{name!r} uses {chunk}-byte chunks, the shared KV pool {self.chunk_size}-"
                    f"byte ones: every engine on one pool must have the same chunk size"
                )
            if self.budget is None:
                self.budget = SharedKVBudget(self.budget_bytes // chunk, chunk)
                self.chunk_size, self._device = chunk, device
            budget = self.budget
        if name is None:
            taken = {x.name for x in budget.stats().leases}
            base = name = engine.runtime.model_name
            for k in range(2, len(taken) + 3):
                if name not in taken:
                    break
                name = f"{base}#{k}"
        member = EngineMember(engine)
        lease = budget.join(name, engine.kv.geometry.chunks_for(1), member, chunk)
        member.lease = lease
        engine.kv.capacity.set_lease(lease)
        pool = engine.pool

        def resize(held: int) -> None:
            # A shrink releases chunks (cuMemRelease), maybe on another engine's thread:
            # the backend asks every thread but its creator's to bind its context first.
            pool.backend.bind_thread()
            pool.set_capacity(held * chunk)

        lease.on_change = resize
        resize(lease.held)
        _limit_requests(budget)
        return lease

    def stats(self) -> BudgetStats | None:
        """Each engine's fixed and granted chunks, and what is unallocated."""
        return None if self.budget is None else self.budget.stats()


def _limit_requests(budget: SharedKVBudget) -> None:
    """One request can hold at most the budget less every engine's fixed chunks: each
    engine's request contract (``InputProcessor``) says so, now that one more joined."""
    stats = budget.stats()
    most = stats.total_chunks - sum(x.fixed_chunks for x in stats.leases)
    for lease in budget.leases():
        engine = cast(EngineMember, lease.member).engine
        geometry = replace(engine.kv.geometry, capacity_chunks=most)
        old = engine.inputs
        engine.inputs = InputProcessor(old.tokenizer, old.vocab_size, old.max_model_len, geometry)


class EngineMember(BudgetMember):
    """An engine's side of the budget (see ``BudgetMember``'s contract)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lease: KVLease | None = None

    def give_back(self, chunks: int, reclaim: bool) -> int:
        lock = self.engine.books_lock
        if not lock.acquire(blocking=False):  # in a step: serve it between steps
            assert self.lease is not None
            self.lease.ask(chunks, reclaim)
            return 0
        try:
            return 0 if self.engine.closed else self.serve(chunks, reclaim)
        finally:
            lock.release()

    def serve(self, chunks: int, reclaim: bool) -> int:
        """With the engine's books lock held: reclaim (if asked), apply and wait for
        every pending command, then settle the lease."""
        engine, kv, lease = self.engine, self.engine.kv, self.lease
        assert lease is not None
        unused = kv.free_chunks
        if reclaim and chunks > unused:
            kv.reclaim(chunks - unused)
        commands = kv.take_commands()
        if commands:
            engine.executor.run(StepPlan(commands))  # fenced like any unmap of the engine's
        engine.arena.wait_all()  # the unmaps are done: the chunks are free in our pool
        return lease.settle(kv.books.committed)

    def serve_asks(self, settle: bool = False) -> None:
        """Between steps (books lock held): serve what other engines asked for; with
        ``settle``, give back the unused grant even if no one asked (an idle engine)."""
        if self.lease is None:
            return
        chunks, reclaim = self.lease.take_asks()
        if chunks or settle:
            self.serve(chunks, reclaim)


def shared_config(config: EngineConfig, kv_pool: SharedKVPool) -> EngineConfig:
    """The engine's config on a shared KV pool: its KV budget is the pool's (the most it
    can ever hold), its device the pool's. Refused where it cannot work."""
    if config.is_parallel:
        raise ValueError("a shared KV pool (kv_pool=) does not support tensor parallelism")
    if config.unified_memory_pool:  # one engine's budget for its KV and workspace
        raise ValueError("a shared KV pool (kv_pool=) does not support unified_memory_pool")
    if config.enable_sleep_mode:  # sleep drops the pool's chunks: not this engine's alone
        raise ValueError("a shared KV pool (kv_pool=) does not support enable_sleep_mode yet")
    if config.kv_cache_bytes is not None and config.kv_cache_bytes != kv_pool.budget_bytes:
        raise ValueError(
            f"kv_cache_bytes={config.kv_cache_bytes} conflicts with the shared KV pool's "
            f"budget of {kv_pool.budget_bytes} bytes: leave it unset"
        )
    device = config.device if config.device is not None else kv_pool.device
    if kv_pool.device is not None and device != kv_pool.device:
        raise ValueError(f"device {device!r} differs from the shared KV pool's {kv_pool.device!r}")
    chunk = config.chunk_size if config.chunk_size is not None else kv_pool.chunk_size
    return replace(config, kv_cache_bytes=kv_pool.budget_bytes, device=device, chunk_size=chunk)
