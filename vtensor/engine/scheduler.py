"""Continuous batching with chunked prefill, FCFS, and preemption by recompute.

Torch-free: it moves :class:`Request` objects between the waiting queue and
the running list, and keeps :class:`KVCacheManager` in step with them.

One step, under a token budget:

1. Running requests, oldest first, get their next chunk (1 token when
   decoding). If the KV cache cannot grow, the newest running request is
   preempted — its slot idles and it goes back to the front of the queue to be
   recomputed — until the growth fits. Nothing is dropped.
2. Waiting requests are admitted in arrival order while the budget, a free
   slot and free chunks allow (strict FCFS: the queue head blocks the rest).
3. Chunks the *next* step will need are mapped ahead when free chunks allow,
   so that the mapper works while the GPU computes.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from vtensor.kvcache.manager import KVCacheManager, KVCommand

from .outputs import FinishReason
from .request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    lookahead_tokens: int = 4  # decode steps mapped ahead (vAttention maps ~10 ahead)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.lookahead_tokens < 0:
            raise ValueError("lookahead_tokens must be >= 0")


@dataclass(frozen=True)
class ScheduledChunk:
    req: Request
    start: int  # first token position computed this step
    num_tokens: int
    samples: bool  # the chunk reaches the end of the request, so a token is sampled

    @classmethod
    def next_of(cls, req: Request, num_tokens: int) -> ScheduledChunk:
        """The next ``num_tokens`` of ``req`` to compute (fixed at scheduling time)."""
        start = req.num_computed
        return cls(req, start, num_tokens, start + num_tokens == req.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request] = field(default_factory=list)
    kv_commands: list[KVCommand] = field(default_factory=list)  # needed by this step
    ahead_commands: list[KVCommand] = field(default_factory=list)  # for later steps

    @property
    def is_decode(self) -> bool:
        return bool(self.chunks) and all(c.num_tokens == 1 for c in self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if req.status is not RequestStatus.WAITING:
            raise ValueError(f"request {req.rid} is {req.status.value}, not waiting")
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if req.num_tokens >= req.max_len:
                continue  # its last token is awaited (async scheduling): it ends on length
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow_or_preempt(req, req.num_computed + n, preempted):
                break  # req preempted itself: nothing newer is left running
            chunks.append(ScheduledChunk.next_of(req, n))
            budget -= n
        if not preempted:
            budget = self._admit(chunks, budget)
        kv_commands = self.kv.drain()
        self._map_ahead(chunks)
        self._premap_waiting()
        return SchedulerOutput(chunks, preempted, kv_commands, self.kv.drain())

    def update(self, chunk: ScheduledChunk, token: int | None) -> None:
        """Record a computed (or launched) chunk and, if it sampled, the new token
        (a ``PLACEHOLDER`` while the token is still on the device)."""
        req = chunk.req
        req.num_computed = chunk.end
        if token is not None:
            req.token_ids.append(token)

    def finish(
        self, req: Request, reason: FinishReason, stop_reason: int | str | None = None
    ) -> None:
        """Finish (or abort) ``req`` wherever it is; its slot idles with its chunks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.release(req.rid)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason, req.stop_reason = RequestStatus.FINISHED, reason, stop_reason

    # ---------------------------------------------------------------- private
    def _grow_or_preempt(self, req: Request, tokens: int, preempted: list[Request]) -> bool:
        """Grow ``req``'s KV to ``tokens``, preempting newest requests as needed.

        Returns False when ``req`` itself had to be preempted.
        """
        while not self.kv.grow(req.rid, tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release(req.rid)
        req.status, req.num_computed = RequestStatus.WAITING, 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            # Admit only if the whole prompt fits, keeping a chunk per running request
            # so decodes can grow without immediately preempting the newcomer.
            if not self.kv.can_admit(req.num_tokens + 1, reserve_chunks=len(self.running)):
                break
            if self.kv.admit(req.rid, req.num_computed + n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk.next_of(req, n))
            budget -= n
        return budget

    def _premap_waiting(self) -> None:
        """Map, during this step, the slots that the next step's admissions will take:
        a prompt's chunks are otherwise mapped in the very step that needs them."""
        budget = self.config.max_num_batched_tokens
        seats = self.config.max_num_seqs - len(self.running)
        wanted: list[int] = []
        for req in itertools.islice(self.waiting, max(0, seats)):
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed, budget)
            wanted.append(req.num_computed + n)
            budget -= n
        if wanted:
            self.kv.premap(wanted, reserve_chunks=len(self.running))

    def _map_ahead(self, chunks: list[ScheduledChunk]) -> None:
        """Opportunistically map what the next steps will write (never steals or preempts)."""
        ahead = self.config.lookahead_tokens
        for c in chunks:
            remaining = c.req.num_tokens - c.end
            target = c.end + (min(remaining, c.num_tokens) if remaining else ahead)
            self.kv.grow(c.req.rid, min(target, c.req.max_len), steal=False)
