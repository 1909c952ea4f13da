"""LLMEngine: requests in, one scheduled, batched forward step at a time.

``step()`` is a straight line: ``_launch(Scheduler.schedule())`` applies the
plan to the requests (this module alone calls a ``Request``'s transitions) and
to the arena (``_apply_kv``, the one place KV commands reach it), then queues
the forward pass and the draw, whose tokens go into the device token table;
``_read`` waits for a launched step's tokens; ``_apply_outputs`` appends them,
checks stops and makes the outputs.

With async scheduling (the default on CUDA) the step launched in one call is
read in the next, so step N+1 is launched, its inputs gathered from the token
table, before the host reads step N: the host's bookkeeping of step N then runs
while the GPU computes step N+1. The price: a request that stops (EOS, stop
string) computes one more token, which is dropped.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch

from vtensor.kvcache.manager import UnmapCommand

from .config import EngineConfig
from .input_processor import InputProcessor, ProcessedPrompt, Prompt, RequestError
from .integrity import check_integrity
from .output_processor import OutputProcessor
from .outputs import FinishReason, StepOutput
from .params import SamplingParams
from .request import Request
from .sampler import PendingSample, Sampler, SamplerRow
from .scheduler import ScheduledSpan, Scheduler, SchedulerConfig, SchedulerOutput
from .setup import (
    SCRATCH_SLOT,
    build_arena,
    build_attention,
    build_runner,
    load_model,
    load_tokenizer,
    map_scratch_slot,
    model_config,
    prefix_cache_for,
    runtime_for,
)
from .stats import EngineStats, StepCounters, collect_stats

log = logging.getLogger("vtensor.engine")


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read."""

    sampling: list[ScheduledSpan]  # the spans that sample, in the draw's row order
    draw: PendingSample | None
    needs_host_tokens: bool  # a row has penalties: its next draw needs these tokens


@dataclass(frozen=True)
class ReadToken:
    """One sampled token as the host reads it."""

    span: ScheduledSpan
    token: int
    logprob: dict[int, float] | None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config, name = model_config(config)
        self.runtime = rt = runtime_for(config, self.model_config, name)
        self.tokenizer = load_tokenizer(config, self.model_config)
        self.model = load_model(config, self.model_config, rt)
        self.arena, self.pool = build_arena(config, rt, self.model_config)
        self.scratch_slot = SCRATCH_SLOT
        cache, self.prefix_caching_note = prefix_cache_for(
            self.arena.geometry, config.enable_prefix_caching
        )
        if self.prefix_caching_note and config.enable_prefix_caching:
            log.warning("prefix caching %s", self.prefix_caching_note)
        self.kv = map_scratch_slot(self.arena, config.keep_idle_chunks, cache)
        sched = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.lookahead_tokens
        )
        self.scheduler = Scheduler(sched, self.kv)
        self.inputs = InputProcessor(
            self.tokenizer, self.model_config.vocab_size, rt.max_model_len, self.kv.geometry
        )
        attn = build_attention(rt, self.arena)
        self.runner = build_runner(config, rt, self.model, attn, self.arena.layout)
        self.sampler = Sampler()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, tuple(eos))
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._generators: dict[int, torch.Generator] = {}
        self._inflight: LaunchedStep | None = None  # async scheduling: the step not yet read
        self._last_launch_done: torch.cuda.Event | None = None  # the unmap fence (_apply_kv)
        self.counters = StepCounters()
        self._closed = False

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
        queued. ``params`` is one for all prompts, or one per prompt.
        """
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
        req = Request.new(rid, pp.prompt_ids, params, pp.max_len, time.perf_counter())
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
            self._finish(req, "abort")
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
        if self.has_unfinished() or not self.kv.reset_prefix_cache():
            return False
        self._settle_if_idle()
        return True

    def set_prefix_caching(self, on: bool) -> None:
        """Switch prefix caching between runs (benchmarks compare on and off in one
        process); the cache starts empty either way."""
        if self.has_unfinished():
            raise RuntimeError("prefix caching can only be switched with no request unfinished")
        cache, note = prefix_cache_for(self.arena.geometry, on)
        if on and note:
            raise ValueError(f"prefix caching is {note}")
        self.kv.set_prefix_cache(cache)
        self.prefix_caching_note = note
        self._settle_if_idle()

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
        launched = self._launch(self.scheduler.schedule())
        read_now = launched is not None and (
            launched.needs_host_tokens or not self.runtime.async_scheduling
        )
        previous, self._inflight = self._inflight, None if read_now else launched
        tokens = self._read(previous)  # waits while `launched` runs on the GPU
        if read_now:
            tokens += self._read(launched)
        outputs = self._apply_outputs(tokens)
        self._settle_if_idle()
        if launched is not None:
            self.counters.steps += 1
            self.counters.step_s += time.perf_counter() - t0
            every = self.config.debug_check_every
            if every and self.counters.steps % every == 0:
                self.check_integrity()
        return outputs

    def _launch(self, out: SchedulerOutput) -> LaunchedStep | None:
        """Apply the plan to its requests and the arena, then queue the forward pass and
        the draw without waiting; the sampled tokens go into the token table."""
        for req in out.preempted:
            req.preempt()
        for a in out.admitted:
            a.req.admit(a.num_cached)
        slots = self._apply_kv(out)
        if not out.spans:
            return None
        forward = self.runner.execute(out.spans, slots)
        sampling = [sp for sp in out.spans if sp.samples]
        draw = None
        if sampling:
            # A penalized row needs every token read: step() reads a penalized step at once.
            rows = [SamplerRow.of(sp.req, self._generators.get(sp.req.rid)) for sp in sampling]
            draw = self.sampler.draw(forward.logits, rows)
            self.runner.tokens.write(forward.sample_slots, draw.tokens)
        for sp in out.spans:
            sp.req.advance(sp.end, sp.samples)  # computed (and sampled) from here on
        if self.runtime.device.type == "cuda":
            self._last_launch_done = torch.cuda.Event()
            self._last_launch_done.record()
        needs_host = any(sp.req.params.has_penalties for sp in sampling)
        return LaunchedStep(sampling, draw, needs_host)

    def _apply_kv(self, out: SchedulerOutput) -> list[int]:
        """The one place KV commands reach the arena: queue the plan's commands on the
        mapper and wait for the chunks this step touches; returns the spans' slots.

        Unmapping first waits for the last launched step (counted as ``unmap_fences``):
        it may still write a slot whose request finished or was aborted since. Maps need
        no wait. The whole window is timed (the mapper thread can also delay this one
        through the GIL).
        """
        t_kv = time.perf_counter()
        for commands in (out.kv_commands, out.ahead_commands):
            done = self._last_launch_done
            unmaps = any(isinstance(c, UnmapCommand) for c in commands)
            if unmaps and done is not None and not done.query():
                self.counters.unmap_fences += 1
                done.synchronize()
            self.arena.apply(commands)
        slots = [self.kv.slot_of(sp.req.rid) for sp in out.spans]
        self.arena.wait_ready(
            (s, self.kv.geometry.chunks_for(sp.end)) for s, sp in zip(slots, out.spans)
        )
        self.counters.kv_sync_s += time.perf_counter() - t_kv
        return slots

    def _settle_if_idle(self) -> None:
        """Releases emit KV commands outside a step; while requests remain, the next
        schedule carries them. With none left, schedule now (an empty plan with those
        commands), so the pool and the books agree whenever the engine is idle."""
        if not self.has_unfinished():
            self._apply_kv(self.scheduler.schedule())

    def _read(self, step: LaunchedStep | None) -> list[ReadToken]:
        """Wait for a launched step's tokens (the GIL is released while waiting)."""
        if step is None or step.draw is None:
            return []
        sampled = step.draw.result()
        return [
            ReadToken(sp, token, logprob)
            for sp, token, logprob in zip(step.sampling, sampled.tokens, sampled.logprobs)
        ]

    def _apply_outputs(self, tokens: list[ReadToken]) -> list[StepOutput]:
        """Append each token to its request, check stops, make the outputs. A request
        that finished after its token was launched (stopped a step earlier, or was
        aborted) drops it: the extra token of async scheduling."""
        now = time.perf_counter()
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
        req.finish(reason, stop_reason)
        self._generators.pop(req.rid, None)

    # ------------------------------------------------------------------ stats
    def check_integrity(self) -> None:
        """Check the pool, slot and request invariants (``engine/integrity.py``); raise
        ``IntegrityError`` naming every one broken. Waits for the mapper thread."""
        check_integrity(self, self._inflight)

    def stats(self) -> EngineStats:
        return collect_stats(self.counters, self.scheduler, self.kv, self.arena, self.pool)

    def close(self) -> None:
        """Abort what is left, unmap every chunk and release the pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid in [r for r, s in self.requests.items() if not s.finished]:
            self.abort(rid)
        self._inflight = None  # only aborted requests' tokens, dropped unread
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)  # no kernel may touch chunks we unmap
        self.runner.graphs = None
        self.arena.close()
        backend = self.pool.backend
        self.pool.close()
        backend.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
