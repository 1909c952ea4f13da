"""The step loop: one scheduled, batched forward step at a time (``LLMEngine.step``).

``step()`` is a straight line: ``launch(Scheduler.schedule())`` applies the plan
to the requests (this module alone calls a ``Request``'s transitions) and to the
arena (``StepExecutor.run``, the one place KV commands reach it), then queues the
forward pass and the draw, whose tokens go into the device token table;
``read_tokens`` (``launched.py``) waits for a launched step's tokens;
``apply_outputs`` appends them, checks stops and makes the outputs. With a host KV
tier, ``_swap`` moves swapped requests and runs their copies (``swap_driver.py``).

With async scheduling (the default on CUDA) the step launched in one call is read
in the next, so step N+1 is launched, its inputs gathered from the token table,
before the host reads step N: the host's bookkeeping of step N then runs while
the GPU computes step N+1. The price: a request that stops (EOS, stop string)
computes one more token, which is dropped.

Under tensor parallelism each step's plan (a :class:`StepPlan`) goes to the
workers before rank 0 runs it itself (``tp_driver.py``).

The loop holds the engine's in-flight state (the launched step not yet read, the
seeded requests' generators); the parts it drives are the engine's, read from it
at each step, because the engine's between-runs switches replace some of them
(``set_slo``, ``set_async_scheduling``, ``set_request_clock``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from vtensor.kvcache.commands import MapCommand

from .executor import StepPlan
from .launched import LaunchedStep, ReadToken, read_tokens
from .outputs import FinishReason, StepOutput
from .request import Request
from .runner import SpanInput
from .sampler import SamplerRow
from .scheduler import SchedulerOutput
from .tp_driver import talking_to

if TYPE_CHECKING:
    from .llm_engine import LLMEngine


class StepLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.inflight: LaunchedStep | None = None  # async scheduling: the step not yet read
        self.generators: dict[int, torch.Generator] = {}  # seeded requests' draws

    def step(self) -> list[StepOutput]:
        """Launch this step, read the previous one, apply the outputs read.

        Async scheduling: the step launched here is read by the next call. It is read
        here instead when synchronous, or when its draw had penalties: the next draw
        needs every real token, so it must not be scheduled before they are read.
        """
        e = self.engine
        t0 = time.perf_counter()
        with e.books_lock, talking_to(e.workers):  # released while the GPU runs
            if e.member is not None:
                e.member.serve_asks()  # other engines' asks on a shared KV pool
            e.kv.reclaim_idle()  # its unmaps and release ride this step's plan
            out = e.scheduler.schedule()
            launched = self.launch(out)
            read_now = launched is not None and (
                launched.needs_host_tokens or not e.runtime.async_scheduling
            )
            previous, self.inflight = self.inflight, None if read_now else launched
        with talking_to(e.workers):
            tokens = read_tokens(previous)  # waits while `launched` runs on the GPU
            if read_now:
                tokens += read_tokens(launched)
        # (the guard's last check: no token read from a step a lost worker broke is kept)
        with e.books_lock:
            outputs = self.apply_outputs(tokens)
            with talking_to(e.workers):
                self.settle_if_idle()
        if launched is not None:
            self._count(time.perf_counter() - t0, out)
        return outputs

    def _count(self, elapsed: float, out: SchedulerOutput) -> None:
        e = self.engine
        e.counters.steps += 1
        e.counters.step_s += elapsed
        if e.slo is not None and not out.is_decode:  # the prefill estimate's input
            e.slo.meter.observe(elapsed, out.num_tokens)
        every = e.config.debug_check_every
        if every and e.counters.steps % every == 0:
            e.check_integrity()

    def launch(self, out: SchedulerOutput) -> LaunchedStep | None:
        """Apply the plan to its requests, then (every rank) to the arena, and queue the
        forward pass and the draw without waiting; the sampled tokens go into the token
        table."""
        e = self.engine
        for req in out.preempted:
            req.preempt()
        copy_in = None if e.swap is None else self._swap(out)  # swap off: nothing runs
        for a in out.admitted:
            a.req.admit(a.num_cached)
        inputs = [SpanInput.of(sp, e.kv.slots.slot_of(sp.req.rid)) for sp in out.spans]
        plan = StepPlan(
            out.kv_commands, out.ahead_commands, inputs, self._pool_chunks(), self._pool_need(out)
        )
        if e.workers is not None and (inputs or plan.kv_commands or plan.ahead_commands):
            e.workers.send(plan)
        segments = None
        if e.spill is not None:
            segments = e.spill.plan(out.kv_commands, out.ahead_commands, out.spills)
            copy_in = e.spill.with_restores(copy_in, out.restores)
        forward = e.executor.run(plan, copy_in, segments)
        if forward is None:
            if e.swap is not None:
                e.swap.wait_deferred()
            if e.spill is not None:
                e.spill.mark_launched()
            return None
        sampling = [sp for sp in out.spans if sp.samples]
        draw = None
        if sampling:
            # A penalized row needs every token read: step() reads a penalized step at once.
            rows = [SamplerRow.of(sp.req, self.generators.get(sp.req.rid)) for sp in sampling]
            draw = e.sampler.draw(forward.logits, rows)
            e.executor.write_tokens(forward, draw.tokens)
        self._count_tokens(out)
        for sp in out.spans:
            sp.req.advance(sp.end, sp.samples)  # computed (and sampled) from here on
        if e.swap is not None:  # swap-ins overlapped the forward; the launch event covers them
            e.swap.wait_deferred()
        e.executor.mark_launched()
        if e.spill is not None:  # after the step's work: its holds' KV is final then
            e.spill.mark_launched()
        needs_host = any(sp.req.params.has_penalties for sp in sampling)
        return LaunchedStep(sampling, draw, needs_host)

    def _count_tokens(self, out: SchedulerOutput) -> None:
        """The launched spans' tokens: all, prefill's, and recomputed ones (tokens below
        ``num_recompute_until``: their KV was computed before a preemption by recompute).
        A decode span is one token past the prompt and past anything recomputed."""
        c = self.engine.counters
        for sp in out.spans:
            req = sp.req
            redo = max(0, min(sp.end, req.num_recompute_until) - sp.start)
            c.computed_tokens += sp.num_tokens
            c.recomputed_prompt_tokens += redo
            if redo or sp.num_tokens > 1 or sp.start < req.num_prompt:
                c.prefill_tokens += sp.num_tokens

    def _pool_chunks(self) -> int | None:
        """The unified pool: the pool's capacity for the step just planned (the KV's
        share and the scratch slot); None without it."""
        memory = self.engine.scheduler.memory
        return None if memory is None else self.engine.scratch_chunks + memory.kv_capacity

    def _pool_need(self, out: SchedulerOutput) -> int | None:
        """The unified pool: at most how many chunks the scratch slot and the KV hold
        while the step's commands apply, in whatever order (its fresh maps counted before
        any unmap, within the KV's share); None without it."""
        engine = self.engine
        memory = engine.scheduler.memory
        if memory is None:
            return None
        commands = [*out.kv_commands, *out.ahead_commands]
        fresh = sum(c.count for c in commands if isinstance(c, MapCommand))
        peak = min(memory.kv_capacity, engine.kv.committed_applied + fresh)
        return engine.scratch_chunks + peak

    def _swap(self, out: SchedulerOutput) -> Callable[[], None] | None:
        """Swap-outs copy now, before the plan's unmaps reach the arena; swap-ins copy in
        the returned hook, once the executor has mapped their chunks (``swap_driver``).
        Unswapped requests wait again before admissions (one may be admitted at once)."""
        swap = self.engine.swap
        assert swap is not None
        for req in out.unswapped:
            req.unswap()
        for p in out.swapped_out:
            p.req.swap_out()
        swap.copy_out(out.swapped_out)
        for p in out.swapped_in:
            p.req.swap_in()
        return swap.copy_in_hook(out.swapped_in)

    def settle_if_idle(self) -> None:
        """Releases emit KV commands outside a step; while requests remain, the next
        schedule carries them. With none left, schedule now (an empty plan with those
        commands), so the pool and the books agree whenever the engine is idle."""
        if not self.engine.has_unfinished():
            self.launch(self.engine.scheduler.schedule())

    def apply_outputs(self, tokens: list[ReadToken]) -> list[StepOutput]:
        """Append each token to its request, check stops, make the outputs. A request
        that finished after its token was launched (stopped a step earlier, or was
        aborted) drops it: the extra token of async scheduling."""
        e = self.engine
        now = e.request_clock()
        outputs: list[StepOutput] = []
        for t in tokens:
            req = t.span.req
            if req.finished:
                continue
            req.append_output(t.span.end, t.token, t.logprob, now)
            decision = e.outputs.on_token(req)
            if decision is not None:
                self.finish(req, decision.reason, decision.stop_reason)
            outputs.append(e.outputs.output(req, t.token, t.logprob))
        return outputs

    def finish(
        self, req: Request, reason: FinishReason, stop_reason: int | str | None = None
    ) -> None:
        e = self.engine
        e.scheduler.remove(req)  # before finish(): it looks up the request's queue
        if e.slo is not None and reason != "abort":
            e.slo.attainment.observe(req, e.slo.config)
        req.finish(reason, stop_reason)
        self.generators.pop(req.rid, None)
