"""Sampler: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Rows are processed together; only seeded rows draw one by one, each from its
request's own generator, so a seeded request samples the same tokens
whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .host_sync import to_host_list
from .params import SamplingParams


@dataclass(frozen=True)
class SamplerRow:
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None  # set for seeded requests


@dataclass(frozen=True)
class SampleResult:
    tokens: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled + top-k, when asked


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if all(r.params.greedy and r.params.logprobs is None and not r.params.has_penalties
               for r in rows):  # fmt: skip
            # The common serving case: one argmax, one transfer. (bf16 -> fp32 is exact and
            # monotonic, so the argmax needs no conversion.)
            return SampleResult(to_host_list(logits.argmax(dim=-1)), [None] * len(rows))
        logits = logits.float()
        raw = logits
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [rows[i] for i in sampled])
        token_list = to_host_list(tokens)
        return SampleResult(token_list, _logprobs(raw, token_list, rows))

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        probs = filter_probs(logits / temps[:, None], rows).softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i] = torch.empty_like(probs[i]).exponential_(generator=r.generator)
        return (probs / noise).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
    """vLLM semantics: repetition over prompt+output (HF's divide/multiply rule),
    presence and frequency over the output only."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor([*r.prompt_ids, *r.output_ids], device=logits.device).unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(list(r.output_ids), device=logits.device)
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
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)
        drop = ranks[None, :] >= ks[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        ps = torch.tensor(top_p, device=logits.device)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _logprobs(
    raw: torch.Tensor, tokens: list[int], rows: Sequence[SamplerRow]
) -> list[dict[int, float] | None]:
    """The model's log-probabilities (before penalties and temperature), as vLLM reports."""
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    result: list[dict[int, float] | None] = [None] * len(rows)
    if not asked:
        return result
    logp = raw[asked].log_softmax(dim=-1)
    k = max(rows[i].params.logprobs or 0 for i in asked)
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    picked = logp.gather(1, torch.tensor([tokens[i] for i in asked], device=raw.device)[:, None])
    for j, i in enumerate(asked):
        want = rows[i].params.logprobs or 0
        entry = {tokens[i]: float(picked[j, 0])}
        for tid, v in zip(top_i[j, :want].tolist(), top_v[j, :want].tolist()):
            entry.setdefault(tid, v)
        result[i] = entry
    return result
