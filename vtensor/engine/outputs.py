"""What generation returns, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a request ended: a stop condition, its length limit, or an abort.
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None  # None while running
    stop_reason: int | str | None = None  # the stop token id or string that matched
    logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (least over samples)


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one engine step (the streaming unit)."""

    rid: int
    new_token_ids: list[int]
    new_text: str  # empty unless the request detokenizes incrementally
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None
    logprobs: dict[int, float] | None = None  # the sampled token's and the top-k, when asked
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
