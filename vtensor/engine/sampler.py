"""Sampler: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Rows are processed together; only seeded rows draw one by one, each from its
request's own generator, so a seeded request samples the same tokens
whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.kernels.argmax import ARGMAX_DTYPES, argmax
from vtensor.kernels.switch import silu_argmax_enabled

from .host_sync import HostCopy, to_device
from .params import SamplingParams
from .request import Request


@dataclass(frozen=True)
class SamplerRow:
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # only for penalties (else empty)
    generator: torch.Generator | None  # set for seeded requests

    @classmethod
    def of(cls, req: Request, generator: torch.Generator | None) -> SamplerRow:
        penalized = req.params.has_penalties
        if penalized and req.num_output_placeholders:
            raise RuntimeError(f"request {req.rid}: penalties need every token; one is unread")
        outputs = req.output_ids if penalized else ()
        return cls(req.params, req.prompt_ids, outputs, generator)


@dataclass(frozen=True)
class SampleResult:
    tokens: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled + top-k, when asked


class PendingSample:
    """One step's draw, queued on the device and on its way to the host.

    ``tokens`` stays on the device: the engine writes it into the token table,
    from which the next step takes its input ids before :meth:`result` is read.
    """

    def __init__(self, tokens: torch.Tensor, logprobs: _DeviceLogprobs | None) -> None:
        self.tokens = tokens
        self._logprobs = logprobs
        tensors = [tokens] if logprobs is None else [tokens, *logprobs.tensors]
        self._copy = HostCopy.start(tensors)

    def result(self) -> SampleResult:
        """Wait for the draw (the GIL is released while waiting) and read it."""
        lists = self._copy.lists()
        tokens = lists[0]
        if self._logprobs is None:
            return SampleResult(tokens, [None] * len(tokens))
        return SampleResult(tokens, self._logprobs.read(tokens, *lists[1:]))


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> SampleResult:
        """Draw and wait: tokens and logprobs as host lists."""
        return self.draw(logits, rows).result()

    def draw(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> PendingSample:
        """Queue the draw on the device; nothing here waits for the GPU.

        Invariant relied on: rows with penalties carry all their output tokens (none
        still unread on the device); the engine ensures it.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if all(r.params.greedy and r.params.logprobs is None and not r.params.has_penalties
               for r in rows):  # fmt: skip
            # The common serving case: one argmax, one transfer. (bf16 -> fp32 is exact and
            # monotonic, so the argmax needs no conversion.)
            return PendingSample(greedy_argmax(logits), None)
        logits = logits.float()
        raw = logits
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if not greedy:
            tokens = self._sample(logits, rows)
        elif len(greedy) == len(rows):
            tokens = logits.argmax(dim=-1)
        else:  # device-side indices throughout: see host_sync.to_device
            sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
            g, s = _index(greedy, logits.device), _index(sampled, logits.device)
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            tokens[g] = logits[g].argmax(dim=-1)
            tokens[s] = self._sample(logits[s], [rows[i] for i in sampled])
        return PendingSample(tokens, _DeviceLogprobs.of(raw, tokens, rows))

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        temps = _floats([r.params.temperature for r in rows], logits.device)
        probs = filter_probs(logits / temps[:, None], rows).softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p. Unseeded rows
        # draw together; seeded ones each from their request's generator.
        noise = torch.empty_like(probs).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i] = torch.empty_like(probs[i]).exponential_(generator=r.generator)
        return (probs / noise).argmax(dim=-1)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)``: by our kernel on CUDA (``kernels/argmax.py``: the same
    answer, ties and NaN included; torch's reduction read Llama-3's 128256 logits ~8x
    under the HBM ceiling at batch 16), torch's elsewhere or with
    ``VTENSOR_SILU_ARGMAX=0``. Only the all-greedy fast path uses it: the other paths
    already convert, clone and reduce the logits in fp32 several times over, and an fp32
    variant would compile on the first such request, mid-serving."""
    if logits.is_cuda and logits.dtype in ARGMAX_DTYPES and silu_argmax_enabled():
        return argmax(logits, impl="triton")
    return logits.argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
    """vLLM semantics: repetition over prompt+output (HF's divide/multiply rule),
    presence and frequency over the output only."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = _index([*r.prompt_ids, *r.output_ids], logits.device).unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            out = _index(list(r.output_ids), logits.device)
            counts = torch.zeros(vocab, device=logits.device).scatter_add_(
                0, out, torch.ones_like(out, dtype=torch.float)
            )
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_probs(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
    """Mask logits outside top-k, top-p (nucleus) and min-p to -inf."""
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    vocab = logits.shape[1]
    if any(0 < k < vocab for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ks = _index([k if 0 < k < vocab else vocab for k in top_k], logits.device)
        ranks = torch.arange(vocab, device=logits.device)
        drop = ranks[None, :] >= ks[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        ps = _floats(top_p, logits.device)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = _floats(min_p, logits.device)[:, None] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


@dataclass(frozen=True)
class _DeviceLogprobs:
    """The model's log-probabilities (before penalties and temperature), as vLLM
    reports them, for the rows that asked: computed on the device, read later."""

    asked: list[int]  # rows that asked for logprobs
    wants: list[int]  # top-k size per asked row
    picked: torch.Tensor  # [A] the sampled token's logprob
    top_v: torch.Tensor  # [A, k]
    top_i: torch.Tensor  # [A, k]

    @classmethod
    def of(
        cls, raw: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplerRow]
    ) -> _DeviceLogprobs | None:
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not asked:
            return None
        rows_d = _index(asked, raw.device)
        logp = raw[rows_d].log_softmax(dim=-1)
        wants = [rows[i].params.logprobs or 0 for i in asked]
        top_v, top_i = logp.topk(max(wants), dim=-1)
        picked = logp.gather(1, tokens[rows_d][:, None])[:, 0]
        return cls(asked, wants, picked, top_v, top_i)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.picked, self.top_v, self.top_i]

    def read(
        self, tokens: list[int], picked: list[float], top_v: list[list[float]],
        top_i: list[list[int]],
    ) -> list[dict[int, float] | None]:  # fmt: skip
        """Per row: {sampled token: logprob, then the top-k}, or None if not asked."""
        result: list[dict[int, float] | None] = [None] * len(tokens)
        for j, i in enumerate(self.asked):
            entry = {tokens[i]: picked[j]}
            for tid, v in zip(top_i[j][: self.wants[j]], top_v[j][: self.wants[j]]):
                entry.setdefault(tid, v)
            result[i] = entry
        return result


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.long, device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)
