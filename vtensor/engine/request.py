"""Request: one request's tokens and progress through the engine (torch-free).

``token_ids`` is the prompt followed by the generated tokens. The KV of the
first ``num_computed`` of them is in the cache. A step computes a chunk
``[num_computed, num_computed + n)``; when the chunk reaches the end of
``token_ids``, the step samples one more token. Prefill, chunked prefill,
decode and recompute after preemption are all this one rule.

With async scheduling a sampled token is known on the device a step before
the host reads it: ``token_ids`` then ends in :data:`PLACEHOLDER`, which
counts as a token (the next step computes it, fed from the device) and is
replaced by the real id when the host reads the step. Invariant: only the
last token can be a placeholder.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from .outputs import FinishReason
from .params import SamplingParams

PLACEHOLDER = -1  # a sampled token the host has not read yet (never a real id)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    rid: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_len: int  # the request's total-length cap: prompt + max_tokens, within context
    arrival: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @classmethod
    def new(
        cls, rid: int, prompt: Seq[int], params: SamplingParams, max_len: int, arrival: float
    ) -> Request:
        return cls(rid, tuple(prompt), params, max_len, arrival)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def awaits_token(self) -> bool:
        """Whether the last token is a placeholder still being read from the device."""
        return self.token_ids[-1] == PLACEHOLDER

    def resolve(self, index: int, token: int) -> None:
        """Put the real ``token`` where the placeholder at ``index`` stands."""
        if self.token_ids[index] != PLACEHOLDER:
            raise RuntimeError(f"request {self.rid}: token {index} is not awaited")
        self.token_ids[index] = token

    def drop_placeholder(self) -> None:
        """Forget the awaited token, if any: the request ended before it was read."""
        if self.awaits_token:
            self.token_ids.pop()
