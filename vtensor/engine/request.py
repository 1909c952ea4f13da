"""Request: one request's tokens and progress through the engine (torch-free).

``token_ids`` is the prompt followed by the generated tokens the host has
read. The KV of the first ``num_computed`` tokens is in the cache. A step
computes a span ``[num_computed, num_computed + n)``; when the span reaches
the end (``num_tokens``), the step samples one more token. Prefill, chunked
prefill (a prompt in several spans), decode and recompute after preemption
are all this one rule.

With async scheduling a sampled token exists on the device a step before the
host reads it. It is counted, not stored: ``num_output_placeholders`` (vLLM's
name) says how many sampled tokens follow ``token_ids`` that the host has not
read yet. ``num_tokens`` includes them, so the scheduler plans the next step
over them; the runner takes such a token from the device token table
(``engine/token_table.py``) by the request's slot.

Who writes a Request: only its methods below, and only the engine's step loop
calls them (``engine/step_loop.py``). The scheduler plans over requests and the
output processor decides stops, but both only read them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from .outputs import FinishReason
from .params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV in the host tier; keeps its slot
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's queues remove requests by identity
class Request:
    rid: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_len: int  # prompt + max_tokens (the request contract keeps it within the context)
    arrival: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    num_output_placeholders: int = 0  # sampled on the device, not read by the host yet
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Tokens whose KV was computed before the request was last preempted by recompute
    # (or its swap dropped): computing any of them again is recomputation.
    num_recompute_until: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    first_token_time: float | None = None  # on the engine's request clock, like arrival
    last_token_time: float | None = None
    num_cached_tokens: int | None = None  # served by the prefix cache at first admission

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @classmethod
    def new(
        cls, rid: int, prompt: Sequence[int], params: SamplingParams, max_len: int, arrival: float
    ) -> Request:
        return cls(rid, tuple(prompt), params, max_len, arrival)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Every token of the request, read or still on the device."""
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def output_ids(self) -> list[int]:
        """The generated tokens the host has read."""
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    # ------------------------------------------------------------ transitions
    # Called by LLMEngine only; each checks the state it expects.

    def admit(self, num_cached: int = 0) -> None:
        """The scheduler gave the request a slot whose first ``num_cached`` tokens' KV came
        from the prefix cache: the request computes from there."""
        self._expect(RequestStatus.WAITING)
        if not 0 <= num_cached < self.num_tokens:
            raise RuntimeError(f"request {self.rid}: {num_cached} cached of {self.num_tokens}")
        self.status, self.num_computed = RequestStatus.RUNNING, num_cached
        if self.num_cached_tokens is None:  # vLLM's rule: the first admission's hit
            self.num_cached_tokens = num_cached

    def preempt(self) -> None:
        """The scheduler took the slot back: the KV is recomputed from token 0 later.
        A token still on the device stays counted; it is read like any other."""
        self._expect(RequestStatus.RUNNING)
        self.num_recompute_until = max(self.num_recompute_until, self.num_computed)
        self.status, self.num_computed = RequestStatus.WAITING, 0
        self.num_preemptions += 1

    def swap_out(self) -> None:
        """Preempted with its KV copied to the host tier: it keeps ``num_computed``."""
        self._expect(RequestStatus.RUNNING)
        self.status = RequestStatus.SWAPPED
        self.num_preemptions += 1

    def swap_in(self) -> None:
        """Its KV is copied back into its slot: it computes on from ``num_computed``."""
        self._expect(RequestStatus.SWAPPED)
        self.status = RequestStatus.RUNNING

    def unswap(self) -> None:
        """Its host copy was dropped (the pool could not take it back): it waits to be
        recomputed from token 0, like a request preempted by recompute."""
        self._expect(RequestStatus.SWAPPED)
        self.num_recompute_until = max(self.num_recompute_until, self.num_computed)
        self.status, self.num_computed = RequestStatus.WAITING, 0

    def advance(self, end: int, sampled: bool) -> None:
        """A step computing up to token ``end`` was launched; it may sample one more."""
        self._expect(RequestStatus.RUNNING)
        self.num_computed = end
        self.num_output_placeholders += sampled

    def append_output(
        self, index: int, token: int, logprob: dict[int, float] | None, now: float
    ) -> None:
        """The host read the sampled token at ``index`` (the first one not read yet)."""
        if self.num_output_placeholders < 1 or index != len(self.token_ids):
            raise RuntimeError(
                f"request {self.rid}: token {index} read, but {len(self.token_ids)} are read "
                f"and {self.num_output_placeholders} awaited"
            )
        self.token_ids.append(token)
        self.num_output_placeholders -= 1
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """Stop, length or abort. Tokens still on the device are dropped: a request
        that stops at step N was already launched in step N+1 (async scheduling)."""
        self.status, self.finish_reason, self.stop_reason = (
            RequestStatus.FINISHED,
            reason,
            stop_reason,
        )
        self.num_output_placeholders = 0

    def _expect(self, status: RequestStatus) -> None:
        if self.status is not status:
            raise RuntimeError(f"request {self.rid} is {self.status.value}, not {status.value}")
