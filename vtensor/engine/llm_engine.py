"""LLMEngine: requests in, one scheduled, batched forward step at a time.

A step: schedule → queue the KV mapping it needs (and mapping ahead for the
next steps) → wait only for the chunks this step touches → forward → sample
→ check stop conditions → release finished requests' slots.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch

from vtensor.kvcache.manager import KVCacheManager
from vtensor.models.attention import VirtualKVAttention
from vtensor.models.tokenizer import IncrementalDetokenizer

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .outputs import StepOutput
from .params import SamplingParams
from .runner import ModelRunner
from .sampler import Sampler, SamplerRow
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence
from .setup import build_arena, load_model, load_tokenizer, model_config, runtime_for
from .stop import check_stop


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    preemptions: int
    steps: int
    step_s: float  # total wall time in step()
    mapper_wait_s: float  # time steps blocked on KV mapping
    mapper_waits: int  # steps that blocked at all
    kv_sync_s: float  # queue-to-ready time of each step's mapping (upper bound on its cost)
    live_kv_bytes: int  # KV of running requests' computed tokens
    mapped_kv_bytes: int  # chunks committed to running slots
    idle_kv_bytes: int  # chunks kept by idle slots (deferred reclamation)
    surplus_kv_bytes: int  # running slots' chunks inherited beyond their needs (ditto)
    chunk_size: int
    pool_in_use_chunks: int
    pool_free_chunks: int
    pool_capacity_chunks: int

    @property
    def waste_bytes(self) -> int:
        """Mapped to running slots but holding no KV, excluding the surplus kept on purpose."""
        return self.mapped_kv_bytes - self.surplus_kv_bytes - self.live_kv_bytes


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
        attn = VirtualKVAttention(self.arena.views, impl=rt.attention_impl)
        graphs = None
        if rt.use_cuda_graphs:
            scratch_row = self.arena.layout.row_start(self.scratch_slot)
            graphs = DecodeGraphs(
                self.model, attn, config.max_num_seqs, rt.max_model_len, scratch_row, rt.device
            )
            graphs.capture()
        self.runner = ModelRunner(self.model, attn, self.arena.layout, rt.device, graphs)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(
            self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        )
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._generators: dict[int, torch.Generator] = {}
        self._detoks: dict[int, IncrementalDetokenizer] = {}
        self._streamed: dict[int, int] = {}  # characters of text handed out in StepOutputs
        self._steps, self._step_s, self._kv_sync_s = 0, 0.0, 0.0
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
        seq = Sequence.new(rid, ids, params, max_len, time.perf_counter())
        if params.seed is not None:
            gen = torch.Generator(device=self.runtime.device)
            self._generators[rid] = gen.manual_seed(params.seed)
        if self.tokenizer is not None and (params.stop or stream_text):
            self._detoks[rid] = IncrementalDetokenizer(self.tokenizer, ids[-4:])
        self.seqs[rid] = seq
        self.scheduler.add(seq)
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
        seq = self.seqs.get(rid)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")
            self._forget(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def text_of(self, rid: int) -> str:
        """The request's output text (stop strings already cut)."""
        seq = self.seqs[rid]
        if rid in self._detoks:
            return self._detoks[rid].text
        if self.tokenizer is None:
            return ""
        skip = seq.params.skip_special_tokens
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=skip)

    def pop(self, rid: int) -> Sequence:
        """Hand a finished request's sequence to the caller and drop the engine's records."""
        seq = self.seqs.pop(rid)
        self._detoks.pop(rid, None)
        self._streamed.pop(rid, None)
        return seq

    # ------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        # The KV sync window: from queueing the maps to the step's chunks being ready.
        # Timed as a whole (not just the blocking wait) because the mapper thread can also
        # delay this thread through the GIL; this is the mapping cost the step really pays.
        t_kv = time.perf_counter()
        self.arena.apply(out.kv_commands)
        self.arena.apply(out.ahead_commands)
        slots = [self.kv.slot_of(c.seq.rid) for c in out.chunks]
        self.arena.wait_ready(
            (s, self.kv.geometry.chunks_for(c.end)) for s, c in zip(slots, out.chunks)
        )
        self._kv_sync_s += time.perf_counter() - t_kv
        logits = self.runner.execute(out.chunks, slots)
        results = self._sample_and_update(out, logits)
        self._steps += 1
        self._step_s += time.perf_counter() - t0
        return results

    def _sample_and_update(self, out: SchedulerOutput, logits: torch.Tensor) -> list[StepOutput]:
        sampling = [c for c in out.chunks if c.samples]
        rows = [
            SamplerRow(
                c.seq.params, c.seq.prompt_ids, c.seq.output_ids, self._generators.get(c.seq.rid)
            )
            for c in sampling
        ]
        sampled = self.sampler(logits, rows) if sampling else None
        results: list[StepOutput] = []
        k = 0
        for c in out.chunks:
            if not c.samples:
                self.scheduler.update(c, None)
                continue
            assert sampled is not None
            token, logprob = sampled.tokens[k], sampled.logprobs[k]
            k += 1
            self.scheduler.update(c, token)
            results.append(self._after_token(c.seq, token, logprob))
        return results

    def _after_token(
        self, seq: Sequence, token: int, logprob: dict[int, float] | None
    ) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        if logprob is not None:
            seq.logprobs.append(logprob)
        detok = self._detoks.get(seq.rid)
        delta = detok.push([token]) if detok is not None else ""
        decision = check_stop(seq, self.eos_token_ids, detok, delta)
        if decision is not None:
            if detok is not None and not isinstance(decision.stop_reason, str):
                detok.flush()  # no stop string cut the text: it ends with the last token
            self.scheduler.finish(seq, decision.reason, decision.stop_reason)
            self._forget(seq.rid)
        text = self._stream_delta(seq, detok)
        return StepOutput(
            seq.rid, [token], text, seq.finished, seq.finish_reason, seq.stop_reason, logprob
        )

    def _stream_delta(self, seq: Sequence, detok: IncrementalDetokenizer | None) -> str:
        """New text safe to hand out. While running, the last ``len(longest stop) - 1``
        characters are held back: they may be the start of a stop string, which is cut
        from the output when it completes, and streamed text cannot be taken back."""
        if detok is None:
            return ""
        sent = self._streamed.get(seq.rid, 0)
        hold = 0 if seq.finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        upto = max(sent, len(detok.text) - hold)
        self._streamed[seq.rid] = upto
        return detok.text[sent:upto]

    def _forget(self, rid: int) -> None:
        self._generators.pop(rid, None)

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        geo, usage = self.kv.geometry, self.kv.usage()
        live = sum(s.num_computed for s in self.scheduler.running) * geo.bytes_per_token
        arena, pool = self.arena.stats(), self.pool.stats()
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            preemptions=self.scheduler.num_preemptions,
            steps=self._steps,
            step_s=self._step_s,
            mapper_wait_s=arena.wait_s,
            mapper_waits=arena.waits,
            kv_sync_s=self._kv_sync_s,
            live_kv_bytes=live,
            mapped_kv_bytes=(usage.committed_chunks - usage.idle_chunks) * geo.chunk_size,
            idle_kv_bytes=usage.idle_chunks * geo.chunk_size,
            surplus_kv_bytes=usage.surplus_chunks * geo.chunk_size,
            chunk_size=geo.chunk_size,
            pool_in_use_chunks=pool.in_use,
            pool_free_chunks=pool.free,
            pool_capacity_chunks=pool.capacity_chunks,
        )

    def close(self) -> None:
        """Abort what is left, unmap every chunk and release the pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid in [r for r, s in self.seqs.items() if not s.finished]:
            self.abort(rid)
        self.runner.graphs = None
        self.arena.close()
        backend = self.pool.backend
        self.pool.close()
        backend.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
