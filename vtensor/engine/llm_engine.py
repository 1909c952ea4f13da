"""LLMEngine: requests in, one scheduled, batched forward step at a time.

A step: schedule → queue the KV mapping it needs (and mapping ahead for the
next steps) → wait only for the chunks this step touches → forward → sample
→ check stop conditions → release finished requests' slots.

With async scheduling (the default on CUDA) a step is *launched*, not
awaited: its sampled tokens stay on the device and feed the next step, which
is scheduled and launched before the host reads them. The host's bookkeeping
of step N (stop checks, detokenizing, outputs) then runs while the GPU
computes step N+1, instead of leaving the GPU idle. The price: a request that
stops (EOS, stop string) computes one more token, which is dropped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from vtensor.kvcache.manager import KVCacheManager, KVCommand, UnmapCommand

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .launched import LaunchedStep
from .output_processor import OutputProcessor
from .outputs import FinishReason, StepOutput
from .params import SamplingParams
from .request import PLACEHOLDER, Request
from .runner import ModelRunner
from .sampler import Sampler, SamplerRow
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .setup import (
    build_arena,
    build_attention,
    load_model,
    load_tokenizer,
    model_config,
    runtime_for,
)
from .stats import EngineStats, StepCounters, collect_stats


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config, name = model_config(config)
        self.runtime = rt = runtime_for(config, self.model_config, name)
        self.tokenizer = load_tokenizer(config, self.model_config)
        self.model = load_model(config, self.model_config, rt)
        self.arena, self.pool = build_arena(config, rt, self.model_config)
        geo = self.arena.geometry
        scratch_chunks = geo.chunks_for(1)
        if geo.capacity_chunks <= scratch_chunks:
            raise ValueError(
                f"KV budget of {self.pool.capacity_bytes} bytes leaves no chunk for requests"
            )
        # Slot 0 is the runner's scratch slot (graph padding), mapped for good. It must be
        # slot 0: every layer view's base pointer lies in its first token, and Triton
        # rejects a kernel argument whose base address is not mapped.
        self.scratch_slot = 0
        self.arena.vt.map(0, scratch_chunks * geo.chunk_size)
        self.kv = KVCacheManager(
            replace(geo, capacity_chunks=geo.capacity_chunks - scratch_chunks),
            keep_idle_chunks=config.keep_idle_chunks,
            reserved_slots=1,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, config.lookahead_tokens
            ),
            self.kv,
        )
        attn = build_attention(rt, self.arena)
        graphs = None
        if rt.use_cuda_graphs:
            scratch_row = self.arena.layout.row_start(self.scratch_slot)
            graphs = DecodeGraphs(
                self.model, attn, config.max_num_seqs, rt.max_model_len, scratch_row, rt.device
            )
            graphs.capture()
        self.runner = ModelRunner(self.model, attn, self.arena.layout, rt.device, graphs)
        self.sampler = Sampler()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, tuple(eos))
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._generators: dict[int, torch.Generator] = {}
        self._inflight: LaunchedStep | None = None  # async scheduling: the step not yet read
        self._last_launch_done: torch.cuda.Event | None = None  # guards unmapping (_sync_kv)
        self.counters = StepCounters()
        self._closed = False

    # --------------------------------------------------------------- requests
    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams, stream_text: bool = False
    ) -> int:
        """Queue a request; returns its id. Bad input raises ``ValueError``, queueing nothing."""
        ids = self.encode(prompt)
        limit = self.runtime.max_model_len
        if len(ids) >= limit:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate within "
                f"max_model_len={limit}"
            )
        max_len = limit if params.max_tokens is None else min(limit, len(ids) + params.max_tokens)
        need, have = self.kv.geometry.chunks_for(max_len), self.kv.geometry.capacity_chunks
        if need > have:
            raise ValueError(
                f"request needs up to {need} KV chunks but the pool holds {have}; "
                f"lower max_tokens or raise the KV budget"
            )
        rid = next(self._ids)
        req = Request.new(rid, ids, params, max_len, time.perf_counter())
        if params.seed is not None:
            gen = torch.Generator(device=self.runtime.device)
            self._generators[rid] = gen.manual_seed(params.seed)
        self.outputs.add(rid, ids, params, stream_text)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def abort(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is not None and not req.finished:
            self._finish(req, "abort")
            self._settle_if_idle()

    def has_unfinished(self) -> bool:
        """Whether a request is waiting, running, or has a token still to be read."""
        if self.scheduler.has_unfinished():
            return True
        return self._inflight is not None and not all(
            c.req.finished for c in self._inflight.sampling
        )

    def text_of(self, rid: int) -> str:
        """The request's output text (stop strings already cut)."""
        return self.outputs.text_of(self.requests[rid])

    def pop(self, rid: int) -> Request:
        """Hand a finished request to the caller and drop the engine's records."""
        req = self.requests.pop(rid)
        self.outputs.forget(rid)
        return req

    def set_async_scheduling(self, on: bool) -> None:
        """Switch between async and synchronous steps, between runs (benchmarks compare)."""
        if self.has_unfinished():
            raise RuntimeError("async scheduling can only be switched with no request unfinished")
        self._read(self._take_inflight())  # only finished requests' tokens: all dropped
        self.runtime = replace(self.runtime, async_scheduling=on)

    # ------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Run one step and return the tokens read in it.

        Synchronous: this step's tokens. Async scheduling: this step is launched and
        the *previous* step's tokens are read while it runs; a call with nothing
        left to schedule just reads the last one.
        """
        t0 = time.perf_counter()
        results: list[StepOutput] = []
        if self._inflight is not None and self._inflight.needs_host_tokens:
            results = self._read(self._take_inflight())  # penalties count every real token
        out = self.scheduler.schedule()
        if not out.chunks:  # its commands still count: releases since the last schedule
            self._sync_kv(out)
            results += self._read(self._take_inflight())
            self._settle_if_idle()
            return results
        slots = self._sync_kv(out)
        launched = self._launch(out, slots)
        results += self._read(self._take_inflight())  # overlaps this step's GPU work
        if self.runtime.async_scheduling:
            self._inflight = launched
        else:
            results += self._read(launched)
        self._settle_if_idle()
        self.counters.steps += 1
        self.counters.step_s += time.perf_counter() - t0
        return results

    def _sync_kv(self, out: SchedulerOutput) -> list[int]:
        """Queue the step's KV mapping and wait for the chunks it touches; its slots.

        The whole window is timed (the mapper thread can also delay this one through
        the GIL). Unmapping first waits for the last launched step: it may still write
        into a slot whose request finished or was aborted since, now being reclaimed.
        """
        t_kv = time.perf_counter()
        self._apply_kv(out.kv_commands)
        self._apply_kv(out.ahead_commands)
        slots = [self.kv.slot_of(c.req.rid) for c in out.chunks]
        self.arena.wait_ready(
            (s, self.kv.geometry.chunks_for(c.end)) for s, c in zip(slots, out.chunks)
        )
        self.counters.kv_sync_s += time.perf_counter() - t_kv
        return slots

    def _apply_kv(self, commands: list[KVCommand]) -> None:
        """Queue KV commands on the mapper; unmapping first lets the last launched step
        finish, since it may still write a slot its request has left since."""
        done = self._last_launch_done
        unmaps = any(isinstance(c, UnmapCommand) for c in commands)
        if unmaps and done is not None and not done.query():
            self.counters.unmap_fences += 1
            done.synchronize()
        self.arena.apply(commands)

    def _settle_if_idle(self) -> None:
        """Releases emit KV commands outside ``schedule()``; while requests remain, the
        next schedule applies them. With none left, apply them now, so the pool and
        the manager's books agree whenever the engine is idle."""
        if not self.has_unfinished():
            self._apply_kv(self.kv.drain())

    def _launch(self, out: SchedulerOutput, slots: list[int]) -> LaunchedStep:
        """Queue the forward and the draw; the chunks count as computed from here on."""
        pending = self._inflight.device_tokens if self._inflight is not None else None
        logits = self.runner.execute(out.chunks, slots, pending)
        sampling = [c for c in out.chunks if c.samples]
        rows = [
            SamplerRow(
                c.req.params,
                c.req.prompt_ids,
                c.req.output_ids if c.req.params.has_penalties else (),
                self._generators.get(c.req.rid),
            )
            for c in sampling
        ]
        draw = self.sampler.draw(logits, rows) if sampling else None
        for c in out.chunks:
            self.scheduler.update(c, PLACEHOLDER if c.samples else None)
        needs_host = any(c.req.params.has_penalties for c in sampling)
        if self.runtime.device.type == "cuda":
            self._last_launch_done = torch.cuda.Event()
            self._last_launch_done.record()
        return LaunchedStep(sampling, draw, needs_host)

    def _take_inflight(self) -> LaunchedStep | None:
        step, self._inflight = self._inflight, None
        return step

    def _read(self, step: LaunchedStep | None) -> list[StepOutput]:
        """Read a launched step's tokens: resolve placeholders, check stops, make outputs.
        A request finished or aborted since the launch drops its token."""
        if step is None or step.draw is None:
            return []
        sampled = step.draw.result()
        results: list[StepOutput] = []
        for c, token, logprob in zip(step.sampling, sampled.tokens, sampled.logprobs):
            req = c.req
            if req.finished:
                continue
            req.resolve(c.end, token)
            decision = self.outputs.on_token(req, c.end, logprob)
            if decision is not None:
                self._finish(req, decision.reason, decision.stop_reason)
            results.append(self.outputs.output(req, token, logprob))
        return results

    def _finish(
        self, req: Request, reason: FinishReason, stop_reason: int | str | None = None
    ) -> None:
        # A token launched after the one that stopped it (or in flight at an abort)
        # is dropped; its row of the step in flight is skipped when read.
        req.drop_placeholder()
        self.scheduler.finish(req, reason, stop_reason)
        self._generators.pop(req.rid, None)

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        return collect_stats(self.counters, self.scheduler, self.kv, self.arena, self.pool)

    def close(self) -> None:
        """Abort what is left, unmap every chunk and release the pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid in [r for r, s in self.requests.items() if not s.finished]:
            self.abort(rid)
        self._read(self._take_inflight())
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
