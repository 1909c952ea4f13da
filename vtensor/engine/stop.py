"""Stop conditions, checked after each sampled token (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from vtensor.models.tokenizer import IncrementalDetokenizer

from .outputs import FinishReason
from .params import SamplingParams
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
    if detok is not None and (hit := cut_stop_string(detok, new_text, p)) is not None:
        return hit
    if p.max_tokens is not None and req.num_output >= p.max_tokens:
        return StopDecision("length")
    if len(req.token_ids) >= req.max_len:
        return StopDecision("length")
    return None


def cut_stop_string(
    detok: IncrementalDetokenizer, new_text: str, params: SamplingParams
) -> StopDecision | None:
    """Whether a stop string ends in ``new_text``, just added to ``detok.text``; if so,
    the text is cut at the earliest match (kept when ``include_stop_str_in_output``)."""
    if not params.stop or not new_text:
        return None
    hit = _find_stop(detok.text, len(new_text), params.stop)
    if hit is None:
        return None
    at, stop = hit
    detok.text = detok.text[: at + len(stop) if params.include_stop_str_in_output else at]
    return StopDecision("stop", stop)


def _find_stop(text: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string ending in the new text (a match may start before it)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best
