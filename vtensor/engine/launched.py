"""A launched step: queued on the device, its sampled tokens not yet read by the host.

``StepLoop.launch`` returns one; with async scheduling the engine keeps it
while it launches the next step and reads it (``read_tokens``) one call later,
so the host's bookkeeping of step N overlaps the GPU's step N+1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sampler import PendingSample
from .scheduler_output import ScheduledSpan


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read."""

    sampling: list[ScheduledSpan]  # the spans that sample, in the draw's row order
    draw: PendingSample | None
    needs_host_tokens: bool  # a row has penalties: its next draw needs these tokens


@dataclass(frozen=True)
class ReadToken:
    """One sampled token as the host reads it."""

    span: ScheduledSpan
    token: int
    logprob: dict[int, float] | None


def read_tokens(step: LaunchedStep | None) -> list[ReadToken]:
    """Wait for a launched step's tokens (the GIL is released while waiting)."""
    if step is None or step.draw is None:
        return []
    sampled = step.draw.result()
    return [
        ReadToken(sp, token, logprob)
        for sp, token, logprob in zip(step.sampling, sampled.tokens, sampled.logprobs)
    ]
