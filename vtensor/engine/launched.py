"""LaunchedStep: a step queued on the device whose sampled tokens the host has not read.

Async scheduling keeps at most one: the next step is launched with its tokens
fed from the device (:class:`DeviceTokens`) before the host reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .runner import DeviceTokens
from .sampler import PendingSample
from .scheduler import ScheduledChunk


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read."""

    sampling: list[ScheduledChunk]  # the chunks that sample, in the draw's row order
    draw: PendingSample | None
    needs_host_tokens: bool  # a row has penalties: the next draw needs these tokens

    @property
    def device_tokens(self) -> DeviceTokens | None:
        if self.draw is None:
            return None
        return DeviceTokens(self.draw.tokens, {c.req.rid: k for k, c in enumerate(self.sampling)})
