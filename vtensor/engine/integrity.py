"""The engine's invariants in one place: ``LLMEngine.check_integrity`` runs these.

Three sets, each a list of what is broken (empty when all hold):

* **pool** — the chunk pool balances (``created == free + in_use``), every chunk
  in use has exactly one reference (the engine maps each chunk once: there is
  no prefix sharing yet), the arena maps exactly the chunks in use, and those
  are the scratch slot's plus the KV manager's books, less what its commands
  not yet applied will change;
* **slots** — the KV manager's own invariants (``sum(mapped) == committed <=
  capacity``, no slot shared, ...), every running request owns a slot and no
  other request does, and each running request's computed KV is mapped;
* **requests** — each request is in exactly the queue its status says (a
  finished one in none), a waiting one has computed nothing, ``num_computed <=
  tokens read <= max_len``, the prompt is a prefix of ``token_ids``, and a
  request has a token on the device exactly when the step in flight sampled
  it, at the position it will be read to;
* **workers** (tensor parallelism) — every worker's arena maps exactly the
  chunks rank 0's does, and its pool holds as many: they applied every command.

Meant for tests and debugging (``EngineConfig.debug_check_every``): it waits
for the mapper thread and walks every request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from vtensor.kvcache.manager import MapCommand

from .request import Request, RequestStatus

if TYPE_CHECKING:
    from .llm_engine import LaunchedStep, LLMEngine
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
    ]
    if problems:
        raise IntegrityError("engine state is inconsistent:\n  " + "\n  ".join(problems))


def pool_problems(engine: LLMEngine) -> list[str]:
    s = engine.pool.stats()
    # Commands emitted by the KV manager but not yet handed to the arena.
    queued = engine.kv.pending_commands()
    pending = sum(c.count if isinstance(c, MapCommand) else -c.count for c in queued)
    books = engine.kv.geometry.chunks_for(1) + engine.kv.usage().committed_chunks - pending
    checks = [
        (s.balanced, f"pool does not balance: created {s.created} != free {s.free} + in use "
                     f"{s.in_use}, or fewer references than chunks in use ({s.references})"),
        (s.references == s.in_use, f"{s.references} references to {s.in_use} chunks in use"),
        (s.created <= s.capacity_chunks, f"{s.created} chunks created over capacity"),
        (engine.arena.vt.mapped_chunks == s.in_use,
         f"arena maps {engine.arena.vt.mapped_chunks} chunks, pool has {s.in_use} in use"),
        (s.in_use == books, f"pool has {s.in_use} chunks in use, the books say {books} "
                            f"(scratch + committed - {pending} pending)"),
    ]  # fmt: skip
    return [what for ok, what in checks if not ok]


def worker_problems(reports: Sequence[ArenaReport]) -> list[str]:
    """Each worker's arena against rank 0's: same chunks mapped, same pool use."""
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
        if r.pool_in_use != ours.pool_in_use:
            problems.append(
                f"rank {r.rank}'s pool has {r.pool_in_use} chunks in use, rank 0's "
                f"{ours.pool_in_use}"
            )
    return problems


def slot_problems(engine: LLMEngine) -> list[str]:
    kv, problems = engine.kv, engine.kv.violations()
    owners = kv.owners()
    running = {r.rid for r in engine.scheduler.running}
    if set(owners) != running:
        problems.append(f"slots owned by {sorted(owners)}, but running: {sorted(running)}")
    for req in engine.scheduler.running:
        computed = kv.geometry.chunks_for(req.num_computed)
        if req.rid in owners and kv.mapped_chunks(req.rid) < computed:
            problems.append(f"request {req.rid}: computed KV beyond its mapped chunks")
    return problems


def request_problems(engine: LLMEngine, inflight: LaunchedStep | None) -> list[str]:
    queued = {id(r) for r in (*engine.scheduler.running, *engine.scheduler.waiting)}
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
    queued = [*sched.running, *sched.waiting]
    if len({id(r) for r in queued}) != len(queued):
        yield "a request is queued twice (or both running and waiting)"
    if len(sched.running) > sched.config.max_num_seqs:
        yield f"{len(sched.running)} running requests over max_num_seqs"
    for req in queued:
        if engine.requests.get(req.rid) is not req:
            yield f"request {req.rid} is queued but not the engine's"
    for queue, status in ((sched.running, RequestStatus.RUNNING),
                          (sched.waiting, RequestStatus.WAITING)):  # fmt: skip
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
