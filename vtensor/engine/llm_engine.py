"""LLMEngine: requests in, one scheduled, batched forward step at a time.

``step()`` is a straight line: ``_launch(Scheduler.schedule())`` applies the
plan to the requests (this module alone calls a ``Request``'s transitions) and
to the arena (``_apply_kv``, the one place KV commands reach it), then queues
the forward pass and the draw, whose tokens go into the device token table;
``read_tokens`` (``launched.py``) waits for a launched step's tokens;
``_apply_outputs`` appends them, checks stops and makes the outputs. With a host
KV tier, ``_swap`` moves swapped requests and runs their copies (``swap_driver.py``).

With async scheduling (the default on CUDA) the step launched in one call is
read in the next, so step N+1 is launched, its inputs gathered from the token
table, before the host reads step N: the host's bookkeeping of step N then runs
while the GPU computes step N+1. The price: a request that stops (EOS, stop
string) computes one more token, which is dropped.

Under tensor parallelism this process is rank 0: the one scheduler, sampler and
server. Each step's plan (a :class:`StepPlan`: KV commands and the runner's
inputs) goes to the workers before rank 0 runs it itself (``tp_driver.py``);
every rank's :class:`StepExecutor` then applies it to its own arena and model
shard, and rank 0's sampled tokens reach every rank's token table on the device.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import torch

from vtensor.distributed import TPGroup, WorkerDiedError
from vtensor.kvcache.commands import MapCommand
from vtensor.kvcache.host_tier import HostTier
from vtensor.kvcache.idle_policy import Clock

from .config import EngineConfig
from .elastic_setup import attach_workspace, estimate_table, install
from .executor import StepExecutor, StepPlan
from .input_processor import InputProcessor, ProcessedPrompt, Prompt, RequestError
from .integrity import check_integrity
from .kv_setup import SCRATCH_SLOT, prefix_cache_for
from .launched import LaunchedStep, ReadToken, read_tokens
from .memory_stats import MemoryStats, collect_memory, module_bytes, with_unified
from .output_processor import OutputProcessor
from .outputs import FinishReason, StepOutput
from .params import SamplingParams
from .request import Request
from .runner import SpanInput
from .sampler import Sampler, SamplerRow
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .setup import load_tokenizer, model_config
from .shared_pool import shared_config
from .sleep import SleepMode
from .slo_setup import slo_admission
from .spill import spill_copier
from .stats import EngineStats, StepCounters, collect_stats
from .swap_setup import swap_driver
from .tp_driver import start_rank_zero, talking_to

if TYPE_CHECKING:
    from vtensor.kvcache.shared_budget import KVLease

    from .shared_pool import EngineMember, SharedKVPool

log = logging.getLogger("vtensor.engine")


class LLMEngine:
    def __init__(
        self, config: EngineConfig, kv_pool: SharedKVPool | None = None, name: str | None = None
    ) -> None:
        """``kv_pool``: draw KV memory from a budget shared with other engines
        (``shared_pool.py``); ``name`` names this engine there (default: the model's)."""
        if kv_pool is not None:
            config = shared_config(config, kv_pool)
        self.config = config
        # Held whenever this engine touches its KV books; another engine on a shared KV
        # pool takes it (never blocking) to reclaim from this one between its steps.
        self.books_lock = threading.RLock()
        self.lease: KVLease | None = None
        self.model_config, _ = model_config(config)
        self.workers, self.parts = start_rank_zero(config, self.model_config)
        parts = self.parts
        self.runtime = rt = parts.runtime
        self.tokenizer = load_tokenizer(config, self.model_config)
        self.model, self.arena, self.pool = parts.model, parts.arena, parts.pool
        self.offload = parts.offload  # weight offload's host copies and ring (or None)
        self.weights = parts.weights  # sleep mode's weight range (or None)
        self.sleep_mode = SleepMode(self, self.weights)
        self.scratch_slot = SCRATCH_SLOT
        self.swap = swap_driver(config, self.model_config, self.arena, rt.dtype)  # None: off
        # Prefix-cache spill: on with the cache and a host tier (not on a shared KV pool,
        # whose reclaims apply their drops outside a step).
        self.spill = spill_copier(self.arena, self.swap, kv_pool is None)
        # Rank 0's books alone decide what is cached; the workers only apply its commands.
        cache, self.prefix_caching_note = prefix_cache_for(
            self.arena.geometry, config.enable_prefix_caching, self._spill_tier()
        )
        if self.prefix_caching_note and config.enable_prefix_caching:
            log.warning("prefix caching %s", self.prefix_caching_note)
        self.kv = parts.kv
        self.kv.set_prefix_cache(cache)  # nothing is mapped yet: no command to send
        sched = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.lookahead_tokens
        )
        # Arrival and token times, and SLO-aware admission's now (tests set a manual clock).
        self.request_clock: Clock = time.perf_counter
        planner = self.swap.planner if self.swap else None
        self.slo = slo_admission(config, planner, self.request_clock)  # None: no SLO
        self.scheduler = Scheduler(sched, self.kv, planner, self.slo)
        self.inputs = InputProcessor(
            self.tokenizer, self.model_config.vocab_size, rt.max_model_len, self.kv.geometry,
            warn=not config.unified_memory_pool,  # install's contract warns instead
        )  # fmt: skip
        if config.unified_memory_pool:  # the estimate; warm-up measures it on a GPU
            itemsize, chunk = rt.dtype.itemsize, self.kv.geometry.chunk_size
            estimate = estimate_table(config, self.model_config, itemsize, chunk)
            install(self, estimate, provisional=rt.device.type == "cuda")
        self.runner = parts.runner
        if config.unified_memory_pool and rt.device.type == "cuda":
            attach_workspace(self)  # the forward's workspace draws on the KV's pool
        self.counters = StepCounters()
        self.executor = StepExecutor(self.arena, self.runner, self.group, self.counters)
        self.sampler = Sampler()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, tuple(eos))
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._generators: dict[int, torch.Generator] = {}
        self._inflight: LaunchedStep | None = None  # async scheduling: the step not yet read
        self.weights_bytes = module_bytes(self.model)
        self._closed = False
        self._member: EngineMember | None = None
        if kv_pool is not None:
            try:
                self.lease = kv_pool.attach(self, name)
            except BaseException:
                self._closed = True
                self._release()  # refused: give back what was built (threads, memory)
                raise
            self._member = cast("EngineMember", self.lease.member)

    @property
    def group(self) -> TPGroup:
        """The tensor-parallel group (one rank without tensor parallelism)."""
        return self.workers.group if self.workers is not None else TPGroup()

    # --------------------------------------------------------------- requests
    def add_requests(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams],
        stream_text: bool = False,
    ) -> list[list[int]]:
        """Queue each prompt's ``n`` samples; per prompt, its samples' request ids.

        Every prompt is checked against the request contract (``engine/input_processor``)
        first: a bad one raises :class:`RequestError` (a ``ValueError``) and nothing is
        queued. ``params`` is one for all prompts, or one per prompt. While asleep it
        raises ``EngineSleepingError`` (``engine/sleep.py``), queuing nothing.
        """
        self.sleep_mode.check_awake()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise RequestError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        processed = [self.inputs.process(p, sp) for p, sp in zip(prompts, plist)]
        return [[self._queue(pp, sample, stream_text) for sample in pp.samples] for pp in processed]

    def add_request(
        self, prompt: Prompt, params: SamplingParams, stream_text: bool = False
    ) -> list[int]:
        """Queue one prompt's ``params.n`` samples; their request ids (see add_requests)."""
        return self.add_requests([prompt], [params], stream_text)[0]

    def _queue(self, pp: ProcessedPrompt, params: SamplingParams, stream_text: bool) -> int:
        rid = next(self._ids)
        req = Request.new(rid, pp.prompt_ids, params, pp.max_len, self.request_clock())
        if params.seed is not None:
            gen = torch.Generator(device=self.runtime.device)
            self._generators[rid] = gen.manual_seed(params.seed)
        self.outputs.add(rid, pp.prompt_ids, params, stream_text)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is not None and not req.finished:
            with self.books_lock:
                self._finish(req, "abort")
                with talking_to(self.workers):
                    self._settle_if_idle()

    def has_unfinished(self) -> bool:
        """Whether a request is waiting or running (any other token in flight is a
        finished request's, dropped unread)."""
        return self.scheduler.has_unfinished()

    def text_of(self, rid: int) -> str:
        """The request's output text (stop strings already cut)."""
        return self.outputs.text_of(self.requests[rid])

    def pop(self, rid: int) -> Request:
        """Hand a finished request to the caller and drop the engine's records."""
        req = self.requests.pop(rid)
        self.outputs.forget(rid)
        return req

    def prefix_caching_summary(self) -> str:
        """One line for logs: on with its block size, or why it is off."""
        cache = self.kv.cache
        if not cache.enabled:
            return self.prefix_caching_note or "off"
        return f"on ({cache.block_tokens}-token blocks of {cache.block_chunks} chunk(s))"

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix and idle slot mapping: all KV chunks go back to the
        pool once the unmaps are applied (at once, since nothing runs). Refused (False,
        nothing changed) while requests are running or waiting."""
        with self.books_lock:
            if self.has_unfinished() or not self.kv.reset_prefix_cache():
                return False
            with talking_to(self.workers):  # every rank drops the same references
                self._settle_if_idle()
        return True

    def set_prefix_caching(self, on: bool) -> None:
        """Switch prefix caching between runs (benchmarks compare on and off in one
        process); the cache starts empty either way."""
        if self.has_unfinished():
            raise RuntimeError("prefix caching can only be switched with no request unfinished")
        cache, note = prefix_cache_for(self.arena.geometry, on, self._spill_tier())
        if on and note:
            raise ValueError(f"prefix caching is {note}")
        with self.books_lock:
            self.kv.set_prefix_cache(cache)
            self.prefix_caching_note = note
            with talking_to(self.workers):
                self._settle_if_idle()

    def set_slo(self, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> None:
        """Switch SLO-aware admission between runs (benchmarks compare it in one
        process); None and None turn it off. Attainment counts start again."""
        if self.has_unfinished():
            raise RuntimeError("SLOs can only be switched with no request unfinished")
        self.config = replace(self.config, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms)
        planner = self.swap.planner if self.swap else None
        self.slo = slo_admission(self.config, planner, self.request_clock)
        self.scheduler.admission = self.slo

    def set_async_scheduling(self, on: bool) -> None:
        """Switch between async and synchronous steps, between runs (benchmarks compare)."""
        if self.has_unfinished():
            raise RuntimeError("async scheduling can only be switched with no request unfinished")
        self._inflight = None  # only finished requests' tokens, dropped unread
        self.runtime = replace(self.runtime, async_scheduling=on)

    # ------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Launch this step, read the previous one, apply the outputs read.

        Async scheduling: the step launched here is read by the next call. It is read
        here instead when synchronous, or when its draw had penalties: the next draw
        needs every real token, so it must not be scheduled before they are read.
        """
        t0 = time.perf_counter()
        with self.books_lock, talking_to(self.workers):  # released while the GPU runs
            if self._member is not None:
                self._member.serve_asks()  # other engines' asks on a shared KV pool
            self.kv.reclaim_idle()  # its unmaps and release ride this step's plan
            out = self.scheduler.schedule()
            launched = self._launch(out)
            read_now = launched is not None and (
                launched.needs_host_tokens or not self.runtime.async_scheduling
            )
            previous, self._inflight = self._inflight, None if read_now else launched
        with talking_to(self.workers):
            tokens = read_tokens(previous)  # waits while `launched` runs on the GPU
            if read_now:
                tokens += read_tokens(launched)
        # (the guard's last check: no token read from a step a lost worker broke is kept)
        with self.books_lock:
            outputs = self._apply_outputs(tokens)
            with talking_to(self.workers):
                self._settle_if_idle()
        if launched is not None:
            elapsed = time.perf_counter() - t0
            self.counters.steps += 1
            self.counters.step_s += elapsed
            if self.slo is not None and not out.is_decode:  # the prefill estimate's input
                self.slo.meter.observe(elapsed, out.num_tokens)
            every = self.config.debug_check_every
            if every and self.counters.steps % every == 0:
                self.check_integrity()
        return outputs

    def _launch(self, out: SchedulerOutput) -> LaunchedStep | None:
        """Apply the plan to its requests, then (every rank) to the arena, and queue the
        forward pass and the draw without waiting; the sampled tokens go into the token
        table."""
        for req in out.preempted:
            req.preempt()
        copy_in = None if self.swap is None else self._swap(out)  # swap off: nothing runs
        for a in out.admitted:
            a.req.admit(a.num_cached)
        inputs = [SpanInput.of(sp, self.kv.slot_of(sp.req.rid)) for sp in out.spans]
        plan = StepPlan(
            out.kv_commands, out.ahead_commands, inputs, self._pool_chunks(), self._pool_need(out)
        )
        if self.workers is not None and (inputs or plan.kv_commands or plan.ahead_commands):
            self.workers.send(plan)
        segments = None
        if self.spill is not None:
            segments = self.spill.plan(out.kv_commands, out.ahead_commands, out.spills)
            copy_in = self.spill.with_restores(copy_in, out.restores)
        forward = self.executor.run(plan, copy_in, segments)
        if forward is None:
            return None
        sampling = [sp for sp in out.spans if sp.samples]
        draw = None
        if sampling:
            # A penalized row needs every token read: step() reads a penalized step at once.
            rows = [SamplerRow.of(sp.req, self._generators.get(sp.req.rid)) for sp in sampling]
            draw = self.sampler.draw(forward.logits, rows)
            self.executor.write_tokens(forward, draw.tokens)
        for sp in out.spans:
            sp.req.advance(sp.end, sp.samples)  # computed (and sampled) from here on
        self.executor.mark_launched()
        needs_host = any(sp.req.params.has_penalties for sp in sampling)
        return LaunchedStep(sampling, draw, needs_host)

    def _spill_tier(self) -> HostTier | None:
        return None if self.spill is None else self.spill.tier

    def _pool_chunks(self) -> int | None:
        """The unified pool: the pool's capacity for the step just planned (the KV's
        share and the scratch slot); None without it."""
        memory = self.scheduler.memory
        return None if memory is None else self.scratch_chunks + memory.kv_capacity

    def _pool_need(self, out: SchedulerOutput) -> int | None:
        """The unified pool: at most how many chunks the scratch slot and the KV hold
        while the step's commands apply, in whatever order (its fresh maps counted before
        any unmap, within the KV's share); None without it."""
        memory = self.scheduler.memory
        if memory is None:
            return None
        commands = [*out.kv_commands, *out.ahead_commands]
        fresh = sum(c.count for c in commands if isinstance(c, MapCommand))
        peak = min(memory.kv_capacity, self.kv.committed_applied + fresh)
        return self.scratch_chunks + peak

    @property
    def scratch_chunks(self) -> int:
        return self.kv.geometry.chunks_for(1)

    def _swap(self, out: SchedulerOutput) -> Callable[[], None] | None:
        """Swap-outs copy now, before the plan's unmaps reach the arena; swap-ins copy in
        the returned hook, once the executor has mapped their chunks (``swap_driver``).
        Unswapped requests wait again before admissions (one may be admitted at once)."""
        assert self.swap is not None
        for req in out.unswapped:
            req.unswap()
        for p in out.swapped_out:
            p.req.swap_out()
        self.swap.copy_out(out.swapped_out)
        for p in out.swapped_in:
            p.req.swap_in()
        return self.swap.copy_in_hook(out.swapped_in)

    def _settle_if_idle(self) -> None:
        """Releases emit KV commands outside a step; while requests remain, the next
        schedule carries them. With none left, schedule now (an empty plan with those
        commands), so the pool and the books agree whenever the engine is idle."""
        if not self.has_unfinished():
            self._launch(self.scheduler.schedule())

    # ------------------------------------------------------------ reclamation
    def reclaim_idle(self) -> int:
        """Bounded deferred reclamation between steps: idle slots past the watermark or
        their idle time (``EngineConfig.kv_idle_timeout_s``) are unmapped and the pool
        releases its free chunks to the driver, on the mapper thread. ``step`` does it
        too; an idle server calls this periodically. Returns the chunks freed."""
        with self.books_lock:
            freed = self.kv.reclaim_idle()
            with talking_to(self.workers):
                self._settle_if_idle()  # with requests running, the next step carries them
            if self._member is not None and not self.has_unfinished():
                self._member.serve_asks(settle=True)  # what went back goes to the budget
        return freed

    def next_reclaim_in(self) -> float | None:
        """Seconds until an idle slot's time runs out (None: none will)."""
        with self.books_lock:
            deadline = self.kv.idle.deadline()
        return None if deadline is None else max(0.0, deadline - self.kv.idle.clock())

    def set_clock(self, clock: Clock) -> None:
        """The clock that idle times are measured on (tests and benchmarks control it)."""
        self.kv.idle.set_clock(clock)

    def set_request_clock(self, clock: Clock) -> None:
        """The clock of arrival and token times and of SLO-aware admission (tests control
        it); only with no request unfinished, so that no request mixes two clocks."""
        if self.has_unfinished():
            raise RuntimeError("the request clock can only be set with no request unfinished")
        self.request_clock = clock
        if self.slo is not None:
            self.slo.clock = clock

    def _apply_outputs(self, tokens: list[ReadToken]) -> list[StepOutput]:
        """Append each token to its request, check stops, make the outputs. A request
        that finished after its token was launched (stopped a step earlier, or was
        aborted) drops it: the extra token of async scheduling."""
        now = self.request_clock()
        outputs: list[StepOutput] = []
        for t in tokens:
            req = t.span.req
            if req.finished:
                continue
            req.append_output(t.span.end, t.token, t.logprob, now)
            decision = self.outputs.on_token(req)
            if decision is not None:
                self._finish(req, decision.reason, decision.stop_reason)
            outputs.append(self.outputs.output(req, t.token, t.logprob))
        return outputs

    def _finish(
        self, req: Request, reason: FinishReason, stop_reason: int | str | None = None
    ) -> None:
        self.scheduler.remove(req)  # before finish(): it looks up the request's queue
        if self.slo is not None and reason != "abort":
            self.slo.attainment.observe(req, self.slo.config)
        req.finish(reason, stop_reason)
        self._generators.pop(req.rid, None)

    # ------------------------------------------------------------------ sleep
    def sleep(self, level: int = 1) -> None:
        """Give the weights' and the KV's memory back (``engine/sleep.py``)."""
        self.sleep_mode.sleep(level)

    def wake_up(self) -> None:
        self.sleep_mode.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_mode.is_sleeping

    # ------------------------------------------------------------------ stats
    def check_integrity(self) -> None:
        """Check the pool, slot and request invariants (``engine/integrity.py``), and that
        every worker's arena maps what rank 0's does; raise ``IntegrityError`` naming
        every one broken. Waits for the mapper thread (every rank's)."""
        with self.books_lock:
            with talking_to(self.workers):
                reports = self.workers.reports(self.parts) if self.workers is not None else []
            check_integrity(self, self._inflight, reports)

    def stats(self) -> EngineStats:
        with self.books_lock:
            return collect_stats(
                self.counters, self.scheduler, self.kv, self.arena, self.pool, self.swap, self.slo
            )

    def memory_stats(self) -> MemoryStats:
        """The bytes this engine (rank 0) holds, by class (``memory_stats.py``); waits for
        the mapper thread, so the KV classes add up to the pool's chunks."""
        scratch = self.scratch_chunks
        weights = self.weights_bytes if self.weights is None else self.weights.held_bytes()
        with self.books_lock:
            m = collect_memory(self.kv, self.arena, weights, scratch, self.weights is None)
            memory = self.scheduler.memory
            return (
                m if memory is None else with_unified(m, memory.snapshot(self.kv), memory.counters)
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Abort what is left, unmap every chunk and release the pool, stop the workers
        (idempotent; a lost worker does not stop the rest of the clean-up)."""
        if self._closed:
            return
        with self.books_lock:  # another engine on a shared KV pool finds it closed
            self._closed = True
            try:
                for rid in [r for r, s in self.requests.items() if not s.finished]:
                    self.abort(rid)
            except WorkerDiedError:
                pass  # the group is gone (reported by the call that found it); release ours
            finally:
                self._release()

    def _release(self) -> None:
        self._inflight = None  # only aborted requests' tokens, dropped unread
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)  # no kernel may touch chunks we unmap
        self.runner.release_graphs()  # first: NCCL's destroy waits on graphs holding its ops
        self.runner.release_workspace()  # its chunks are the pool's
        if self.spill is not None:  # its staging range: nothing mapped between copies
            self.spill.close()
        if self.workers is not None:
            self.workers.close()
        self.arena.close()
        backend = self.pool.backend
        self.pool.close()
        backend.close()
        if self.swap is not None:  # after the synchronize: no copy is in flight
            self.swap.close()
        if self.lease is not None:  # after the pool is closed: its chunks are gone
            self.lease.budget.leave(self.lease)
        if self.offload is not None:  # after the synchronize: no copy is in flight
            self.offload.close()
        if self.weights is not None:  # after the graphs: none may replay over them
            self.weights.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
