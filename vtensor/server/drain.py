"""The graceful shutdown's deadline (the glossary's *drain*), set once.

The first SIGINT/SIGTERM starts the drain: new requests get 503 and running ones
get ``--shutdown-timeout`` seconds before they are aborted. A supervisor may repeat
SIGTERM; that must not push the deadline back, so only the first call sets it and
later ones log how much time is left. Thread-safe: uvicorn calls it from its signal
handler, the engine thread reads it between steps.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("vtensor.server")


class Drain:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None  # time.monotonic(); None: not draining

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def begin(self, timeout_s: float, why: str, open_requests: int) -> float:
        """Start draining (the first call only); returns the deadline."""
        with self._lock:
            if self._deadline is not None:
                left = max(0.0, self._deadline - time.monotonic())
                log.info("%s: already draining; %.1f s left before the rest is aborted", why, left)
                return self._deadline
            self._deadline = time.monotonic() + timeout_s
        log.info("%s: draining: new requests get 503; %d open requests get %.1f s to finish",
                 why, open_requests, timeout_s)  # fmt: skip
        return self._deadline

    def due(self) -> bool:
        """The deadline has passed: what still runs is aborted."""
        return self._deadline is not None and time.monotonic() > self._deadline
