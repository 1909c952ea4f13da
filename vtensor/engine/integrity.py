"""The engine's invariants in one place: ``LLMEngine.check_integrity`` runs these.

Four sets, each a list of what is broken (empty when all hold):

* **pool** — the chunk pool balances (``created == free + in_use``); its
  references are the arena's mappings plus the prefix cache's holds; the chunks
  in use are the scratch slot's plus the KV manager's ``committed`` (as of the
  commands applied). With no command pending, chunk by chunk: each logical chunk
  is one physical chunk wherever it is mapped or held, no two share one, and its
  reference count is its mappings plus one if the cache holds it;
* **slots** — the KV manager's own invariants (books, pins, cache; see
  ``kvcache/manager_checks.py``), every running request owns a slot and no other
  request does, each running request's computed KV is mapped, and the chunks it
  will write (from ``num_computed`` on) are its own alone;
* **unified pool** (``unified_memory_pool``) — the workspace's reserve plus the KV
  committed is at most the one budget, the KV manager's limit is the KV's share,
  and the pool has created no more chunks than that share (a shrink released the
  rest to the driver);
* **requests** — each request is in exactly the queue its status says (a
  finished one in none), a waiting one has computed nothing, ``num_computed <=
  tokens read <= max_len``, the prompt is a prefix of ``token_ids``, and a
  request has a token on the device exactly when the step in flight sampled
  it, at the position it will be read to;
* **workers** (tensor parallelism) — every worker's arena maps exactly the
  chunks rank 0's does, shares them the same way (the same mappings alias one
  physical chunk), its prefix cache holds the same ids, and its pool holds as
  many chunks with as many references: they applied every command.

Meant for tests and debugging (``EngineConfig.debug_check_every``): it waits
for the mapper thread and walks every request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from vtensor.kvcache.host_tier import SwapState
from vtensor.memory import PhysicalChunk

from .request import Request, RequestStatus

if TYPE_CHECKING:
    from vtensor.kvcache.arena import ChunkSignature

    from .launched import LaunchedStep
    from .llm_engine import LLMEngine
    from .tp_worker import ArenaReport


class IntegrityError(RuntimeError):
    """The engine's state broke an invariant (a bug, never a user error)."""


def check_integrity(
    engine: LLMEngine, inflight: LaunchedStep | None, reports: Sequence[ArenaReport] = ()
) -> None:
    """Raise :class:`IntegrityError` listing every broken invariant; ``inflight`` is the
    step launched and not read yet (async scheduling); ``reports`` every rank's arena,
    rank 0's first (tensor parallelism)."""
    engine.arena.wait_all()  # the pool must reflect every command already queued
    problems = [
        *pool_problems(engine),
        *slot_problems(engine),
        *request_problems(engine, inflight),
        *worker_problems(reports),
        *(engine.offload.problems() if engine.offload is not None else []),
        *(engine.weights.problems() if engine.weights is not None else []),
    ]
    if problems:
        raise IntegrityError("engine state is inconsistent:\n  " + "\n  ".join(problems))


def pool_problems(engine: LLMEngine) -> list[str]:
    s = engine.pool.stats()
    kv, arena = engine.kv, engine.arena
    # Commands emitted by the KV manager but not yet taken change `committed` ahead of
    # the pool: compare with its value when the arena last took commands.
    workspace = engine.runner.workspace  # the unified pool's, in the same pool
    ws = 0 if workspace is None else workspace.held_chunks
    books = kv.geometry.chunks_for(1) + kv.committed_applied + ws
    mappings, held = arena.vt.mapped_chunks + ws, len(arena.held)
    checks = [
        (s.balanced, f"pool does not balance: created {s.created} != free {s.free} + in use "
                     f"{s.in_use}, or fewer references than chunks in use ({s.references})"),
        (s.references == mappings + held,
         f"{s.references} references to chunks, but {mappings} mappings + {held} cache holds"),
        (s.created <= s.capacity_chunks, f"{s.created} chunks created over capacity"),
        (s.in_use == books, f"pool has {s.in_use} chunks in use, the books say {books} "
                            f"(scratch + committed when last applied + workspace {ws})"),
    ]  # fmt: skip
    problems = [what for ok, what in checks if not ok]
    if not kv.pending_commands():
        problems += _chunk_problems(engine)
    memory = engine.scheduler.memory
    if memory is not None:
        created = s.created - kv.geometry.chunks_for(1)
        problems += memory.violations(kv, created, None if workspace is None else ws)
    return problems


def _chunk_problems(engine: LLMEngine) -> list[str]:
    """Chunk by chunk: the books' logical chunks against the arena's physical ones."""
    kv, arena, pool = engine.kv, engine.arena, engine.pool
    books = kv.books
    phys: dict[int, PhysicalChunk] = {}
    problems = []
    for slot in range(kv.geometry.num_slots):
        for i, cid in enumerate(kv.slot_table(slot)):
            chunk = arena.chunk_at(slot, i)
            if phys.setdefault(cid, chunk) is not chunk:
                problems.append(f"chunk {cid} is two physical chunks (slot {slot}, index {i})")
    for cid, chunk in arena.held.items():
        if phys.setdefault(cid, chunk) is not chunk:
            problems.append(f"the cache holds chunk {cid} as another physical chunk")
    if set(arena.held) != books.cached_ids():
        problems.append("the arena holds other chunks than the books' cached ones")
    if len({c.cid for c in phys.values()}) != len(phys):
        problems.append("two logical chunks are one physical chunk")
    for cid, chunk in phys.items():
        want = len(books.holders(cid)) + books.is_cached(cid)
        if pool.refcount(chunk) != want:
            problems.append(f"chunk {cid}: {pool.refcount(chunk)} references, {want} holders")
    mapped = kv.geometry.chunks_for(1) + sum(len(t) for t in books.tables)
    if arena.vt.mapped_chunks != mapped:
        problems.append(f"the arena maps {arena.vt.mapped_chunks} chunks, the books {mapped}")
    return problems


def worker_problems(reports: Sequence[ArenaReport]) -> list[str]:
    """Each worker's arena against rank 0's: same chunks mapped, shared the same way,
    the same held by the prefix cache, same pool use and references."""
    if not reports:
        return []
    ours, problems = reports[0], []
    for r in reports[1:]:
        if r.mapped != ours.mapped:
            extra, lacking = set(r.mapped) - set(ours.mapped), set(ours.mapped) - set(r.mapped)
            problems.append(
                f"rank {r.rank}'s arena maps {len(r.mapped)} chunks, rank 0's "
                f"{len(ours.mapped)}: {len(extra)} extra, {len(lacking)} lacking"
            )
        if (r.pool_in_use, r.pool_references) != (ours.pool_in_use, ours.pool_references):
            problems.append(
                f"rank {r.rank}'s pool has {r.pool_in_use} chunks in use with "
                f"{r.pool_references} references, rank 0's {ours.pool_in_use} with "
                f"{ours.pool_references}"
            )
        problems += _signature_problems(r.rank, r.signature, ours.signature)
    return problems


def _signature_problems(rank: int, theirs: ChunkSignature, ours: ChunkSignature) -> list[str]:
    """Where a worker's sharing differs from rank 0's (``KVArena.signature``)."""
    problems = []
    if theirs.mapped != ours.mapped:
        differ = sum(a != b for a, b in zip(theirs.mapped, ours.mapped))
        problems.append(
            f"rank {rank}'s arena shares chunks otherwise than rank 0's ({differ} of "
            f"{len(ours.mapped)} mappings differ)"
        )
    if [cid for cid, _ in theirs.held] != [cid for cid, _ in ours.held]:
        problems.append(
            f"rank {rank}'s prefix cache holds {len(theirs.held)} chunks, rank 0's "
            f"{len(ours.held)}, not the same ids"
        )
    elif theirs.held != ours.held:
        problems.append(f"rank {rank}'s cache holds other physical chunks than rank 0's")
    if theirs.references != ours.references:
        problems.append(f"rank {rank}'s chunks' reference counts differ from rank 0's")
    return problems


def slot_problems(engine: LLMEngine) -> list[str]:
    kv, problems = engine.kv, engine.kv.violations()
    owners = kv.slots.owners()
    running = {r.rid for r in engine.scheduler.running}
    swapped = {r.rid for r in engine.scheduler.swapped}  # they keep their slots
    if set(owners) != running | swapped:
        problems.append(
            f"slots owned by {sorted(owners)}, but running: {sorted(running)}, "
            f"swapped: {sorted(swapped)}"
        )
    problems += _swap_problems(engine)
    for req in engine.scheduler.running:
        if req.rid not in owners:
            continue
        mapped = kv.mapped_chunks(req.rid)
        if mapped < kv.geometry.chunks_for(req.num_computed):
            problems.append(f"request {req.rid}: computed KV beyond its mapped chunks")
        table = kv.slot_table(owners[req.rid])
        ahead = table[kv.geometry.chunk_of(req.num_computed) : mapped]
        if any(not kv.books.is_private(c) for c in ahead):
            problems.append(f"request {req.rid}: a chunk it will write is shared or cached")
    return problems


def _swap_problems(engine: LLMEngine) -> list[str]:
    """Each swapped request's private chunks are in the host tier (resident), none on
    the GPU; the tier's books balance; no request outside the swapped queue is in it."""
    if engine.swap is None:
        return []
    kv, tier = engine.kv, engine.swap.planner.tier
    problems = tier.violations()
    for req in engine.scheduler.swapped:
        ext = tier.extent(req.rid)
        if ext is None or ext.state is not SwapState.HOST:
            problems.append(f"swapped request {req.rid} is not resident in the host tier")
            continue
        if kv.mapped_chunks(req.rid) != ext.first:
            problems.append(f"swapped request {req.rid}: chunks from {ext.first} on still mapped")
        if ext.first + ext.count != kv.geometry.chunks_for(req.num_computed):
            problems.append(f"swapped request {req.rid}: the host tier holds the wrong chunks")
    if tier.usage().requests != len(engine.scheduler.swapped):
        problems.append("the host tier holds a request that is not swapped")
    return problems + _spill_problems(engine)


def _spill_problems(engine: LLMEngine) -> list[str]:
    """Between steps every spilled block is resident (no copy in flight either way),
    and the tier's spill keys are exactly the cache's host blocks."""
    assert engine.swap is not None
    tier, cache = engine.swap.planner.tier, engine.kv.cache
    spills = [k for k in tier.held_keys() if k < 0]
    problems = []
    if any(e is None or e.state is not SwapState.HOST for e in map(tier.extent, spills)):
        problems.append("a spilled block's copy is still in flight between steps")
    if len(spills) != cache.stats().host_blocks:
        problems.append(
            f"the host tier holds {len(spills)} spilled blocks, the cache "
            f"{cache.stats().host_blocks}"
        )
    return problems


def request_problems(engine: LLMEngine, inflight: LaunchedStep | None) -> list[str]:
    sched = engine.scheduler
    queued = {id(r) for r in (*sched.running, *sched.waiting, *sched.swapped)}
    unread: dict[int, list[int]] = {}  # id(request) -> where its tokens in flight go
    for sp in inflight.sampling if inflight is not None else ():
        unread.setdefault(id(sp.req), []).append(sp.end)
    problems = list(_queue_problems(engine))
    for req in engine.requests.values():
        if not req.finished and id(req) not in queued:
            problems.append(f"request {req.rid} is {req.status.value} but in no queue")
        problems += _request_problems(engine, req)
        problems += _unread_problems(req, unread.get(id(req), []))
    return problems


def _queue_problems(engine: LLMEngine) -> Iterator[str]:
    sched = engine.scheduler
    queued = [*sched.running, *sched.waiting, *sched.swapped]
    if len({id(r) for r in queued}) != len(queued):
        yield "a request is queued twice (or both running and waiting)"
    if len(sched.running) > sched.config.max_num_seqs:
        yield f"{len(sched.running)} running requests over max_num_seqs"
    for req in queued:
        if engine.requests.get(req.rid) is not req:
            yield f"request {req.rid} is queued but not the engine's"
    for queue, status in ((sched.running, RequestStatus.RUNNING),
                          (sched.waiting, RequestStatus.WAITING),
                          (sched.swapped, RequestStatus.SWAPPED)):  # fmt: skip
        for req in queue:
            if req.status is not status:
                yield f"request {req.rid} is {req.status.value} in the {status.value} queue"
    if any(r.num_computed for r in sched.waiting):
        yield "a waiting request has computed tokens (it must recompute from 0)"


def _request_problems(engine: LLMEngine, req: Request) -> Iterator[str]:
    rid, read = req.rid, len(req.token_ids)
    if req.finished and req.finish_reason is None:
        yield f"request {rid} finished without a reason"
    if tuple(req.token_ids[: req.num_prompt]) != req.prompt_ids:
        yield f"request {rid}: token_ids do not start with the prompt"
    if not 0 <= req.num_computed <= read <= req.max_len:
        yield f"request {rid}: not 0 <= computed {req.num_computed} <= read {read} <= {req.max_len}"
    if any(not 0 <= t < engine.model_config.vocab_size for t in req.token_ids):
        yield f"request {rid}: a token id outside the vocabulary"
    if req.params.logprobs is not None and len(req.logprobs) != req.num_output:
        yield f"request {rid}: {len(req.logprobs)} logprobs for {req.num_output} tokens"


def _unread_problems(req: Request, in_flight_at: list[int]) -> Iterator[str]:
    """A token on the device is the step in flight's, at the next index to read.
    (A finished request's rows in flight are dropped when read: no token counted.)"""
    unread = req.num_output_placeholders
    if req.finished:
        if unread:
            yield f"request {req.rid} finished with {unread} unread tokens"
    elif unread != len(in_flight_at):
        yield f"request {req.rid}: {unread} unread tokens, {len(in_flight_at)} in flight"
    elif in_flight_at and in_flight_at != [len(req.token_ids)]:
        yield f"request {req.rid}: its token in flight goes to {in_flight_at}, not the next index"
