"""Stop conditions, checked after each sampled token (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from vtensor.models.tokenizer import IncrementalDetokenizer

from .outputs import FinishReason
from .request import Request


@dataclass(frozen=True)
class StopDecision:
    reason: FinishReason  # "stop" or "length"
    stop_reason: int | str | None = None


def check_stop(
    req: Request,
    eos_token_ids: tuple[int, ...],
    detok: IncrementalDetokenizer | None,
    new_text: str,
) -> StopDecision | None:
    """Whether the last token read, ``req.token_ids[-1]``, ends the request.

    vLLM's order: EOS, stop token ids, stop strings, then length limits. A
    matched stop string is cut from ``detok.text`` (kept when
    ``include_stop_str_in_output``). Only reads ``req``.
    """
    token = req.token_ids[-1]
    p = req.params
    if not p.ignore_eos and token in eos_token_ids:
        return StopDecision("stop", None)
    if token in p.stop_token_ids:
        return StopDecision("stop", token)
    if p.stop and detok is not None and new_text:
        hit = _find_stop(detok.text, len(new_text), p.stop)
        if hit is not None:
            at, stop = hit
            cut = at + len(stop) if p.include_stop_str_in_output else at
            detok.text = detok.text[:cut]
            return StopDecision("stop", stop)
    if p.max_tokens is not None and req.num_output >= p.max_tokens:
        return StopDecision("length")
    if len(req.token_ids) >= req.max_len:
        return StopDecision("length")
    return None


def _find_stop(text: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string ending in the new text (a match may start before it)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best
