"""LLMEngine: requests in, one scheduled, batched forward step at a time.

The engine is the request-facing side: it builds rank 0's parts (the scheduling
side in ``scheduling_setup.py``), queues requests, aborts and hands them back,
switches features between runs (``switches.py``), reclaims idle KV between steps,
reports stats (``queries.py``), and tears everything down in order. Each ``step()``
is run by its :class:`StepLoop` (``step_loop.py``): schedule, launch, read, apply,
with async scheduling's step in flight between calls.

Under tensor parallelism this process is rank 0: the one scheduler, sampler and
server. Each step's plan (a :class:`StepPlan`: KV commands and the runner's
inputs) goes to the workers before rank 0 runs it itself (``tp_driver.py``);
every rank's :class:`StepExecutor` then applies it to its own arena and model
shard, and rank 0's sampled tokens reach every rank's token table on the device.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, cast

import torch

from vtensor.distributed import TPGroup, WorkerDiedError
from vtensor.kvcache.idle_policy import Clock

from . import switches
from .config import EngineConfig
from .elastic_setup import build_unified
from .executor import StepExecutor
from .input_processor import InputProcessor, ProcessedPrompt, Prompt, RequestError
from .kv_setup import SCRATCH_SLOT
from .memory_stats import MemoryStats, module_bytes
from .output_processor import OutputProcessor
from .outputs import StepOutput
from .params import SamplingParams
from .queries import engine_integrity, engine_memory_stats, engine_stats
from .request import Request
from .sampler import Sampler
from .scheduling_setup import build_scheduling
from .setup import load_tokenizer, model_config
from .shared_pool import shared_config
from .sleep import SleepMode
from .stats import EngineStats, StepCounters
from .step_loop import StepLoop
from .teardown import release_parts
from .tp_driver import start_rank_zero, talking_to

if TYPE_CHECKING:
    from vtensor.kvcache.shared_budget import KVLease

    from .shared_pool import EngineMember, SharedKVPool


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
        self.kv = parts.kv
        # Arrival and token times, and SLO-aware admission's now (tests set a manual clock).
        self.request_clock: Clock = time.perf_counter
        shared = kv_pool is not None
        s = build_scheduling(config, self.model_config, parts, self.request_clock, shared)
        self.swap, self.spill, self.slo, self.scheduler = s.swap, s.spill, s.slo, s.scheduler
        self.prefix_caching_note = s.prefix_caching_note
        self.inputs = InputProcessor(
            self.tokenizer, self.model_config.vocab_size, rt.max_model_len, self.kv.geometry,
            warn=not config.unified_memory_pool,  # install's contract warns instead
        )  # fmt: skip
        self.runner = parts.runner
        if config.unified_memory_pool:  # the estimate; warm-up measures it on a GPU
            build_unified(self)
        self.counters = StepCounters()
        self.executor = StepExecutor(self.arena, self.runner, self.group, self.counters)
        self.sampler = Sampler()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, tuple(eos))
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.loop = StepLoop(self)  # the step, and what it holds in flight
        self.weights_bytes = module_bytes(self.model)
        self._closed = False
        self.member: EngineMember | None = None  # this engine on a shared KV pool
        if kv_pool is not None:
            self._join(kv_pool, name)

    def _join(self, kv_pool: SharedKVPool, name: str | None) -> None:
        try:
            self.lease = kv_pool.attach(self, name)
        except BaseException:
            self._closed = True
            release_parts(self)  # refused: give back what was built (threads, memory)
            raise
        self.member = cast("EngineMember", self.lease.member)

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
            self.loop.generators[rid] = gen.manual_seed(params.seed)
        self.outputs.add(rid, pp.prompt_ids, params, stream_text)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is not None and not req.finished:
            with self.books_lock:
                self.loop.finish(req, "abort")
                with talking_to(self.workers):
                    self.loop.settle_if_idle()

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

    # --------------------------------------------------------------- switches
    def prefix_caching_summary(self) -> str:
        """One line for logs: on with its block size, or why it is off."""
        return switches.prefix_caching_summary(self)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix and idle slot mapping: all KV chunks go back to the
        pool once the unmaps are applied (at once, since nothing runs). Refused (False,
        nothing changed) while requests are running or waiting."""
        return switches.reset_prefix_cache(self)

    def set_prefix_caching(self, on: bool) -> None:
        """Switch prefix caching between runs (benchmarks compare on and off in one
        process); the cache starts empty either way."""
        switches.set_prefix_caching(self, on)

    def set_slo(self, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> None:
        """Switch SLO-aware admission between runs (benchmarks compare it in one
        process); None and None turn it off. Attainment counts start again."""
        switches.set_slo(self, ttft_slo_ms, tpot_slo_ms)

    def set_async_scheduling(self, on: bool) -> None:
        """Switch between async and synchronous steps, between runs (benchmarks compare)."""
        switches.set_async_scheduling(self, on)

    # ------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Launch this step, read the previous one, apply the outputs read
        (``step_loop.py``)."""
        return self.loop.step()

    @property
    def scratch_chunks(self) -> int:
        return self.kv.geometry.chunks_for(1)

    # ------------------------------------------------------------ reclamation
    def reclaim_idle(self) -> int:
        """Bounded deferred reclamation between steps: idle slots past the watermark or
        their idle time (``EngineConfig.kv_idle_timeout_s``) are unmapped and the pool
        releases its free chunks to the driver, on the mapper thread. ``step`` does it
        too; an idle server calls this periodically. Returns the chunks freed."""
        with self.books_lock:
            freed = self.kv.reclaim_idle()
            with talking_to(self.workers):
                self.loop.settle_if_idle()  # with requests running, the next step carries them
            if self.member is not None and not self.has_unfinished():
                self.member.serve_asks(settle=True)  # what went back goes to the budget
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
        switches.set_request_clock(self, clock)

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
        engine_integrity(self)

    def stats(self) -> EngineStats:
        return engine_stats(self)

    def memory_stats(self) -> MemoryStats:
        """The bytes this engine (rank 0) holds, by class (``memory_stats.py``); waits for
        the mapper thread, so the KV classes add up to the pool's chunks."""
        return engine_memory_stats(self)

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
                release_parts(self)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
