"""``vtensor serve``'s uvicorn server: it tells the engine when a shutdown begins, and
makes a forced exit end every request properly.

uvicorn's own rules: the first SIGINT or SIGTERM starts a graceful shutdown (stop
accepting, wait for the open connections, then the app's lifespan shutdown); a second
SIGINT forces the exit, which skips both waits. Ours, on top:

- the first signal drains the engine (``AsyncEngine.drain``: new requests get 503,
  running ones get ``shutdown_timeout`` seconds, then are aborted); a repeated signal
  keeps the deadline;
- a forced exit ends every open request with an error at once (streams: an error
  event and ``[DONE]``), waits up to ``FORCED_GRACE_S`` for those answers to go out,
  then stops the engine, waiting up to ``FORCED_STOP_S`` (it finishes its step, then
  unmaps its KV). What happened is logged and kept in ``forced``, so that the command
  exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import uvicorn

from .async_engine import AsyncEngine

log = logging.getLogger("vtensor.server")
FORCED_GRACE_S = 2.0  # for the open streams to write their error event and [DONE]
FORCED_STOP_S = 5.0  # for the engine thread to finish its step and release the KV
FORCED_REASON = "the server was forced to exit (a second interrupt) before this finished"


@dataclass(frozen=True)
class ForcedExit:
    """What a forced exit did."""

    requests: int  # open requests ended with an error
    engine_stopped: bool  # the engine thread ended (and closed the engine) in time

    def describe(self) -> str:
        engine = (
            "the engine stopped and released its KV memory"
            if self.engine_stopped
            else f"the engine did not stop within {FORCED_STOP_S:.0f} s and was left running"
        )
        return f"forced exit: {self.requests} open requests ended with an error; {engine}"


class Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncEngine | Sequence[AsyncEngine],
        drain_s: float,
    ) -> None:
        """``engine``: the server's engine thread, or one per model (several models)."""
        super().__init__(config)
        self.engines = [engine] if isinstance(engine, AsyncEngine) else list(engine)
        self.engine, self.drain_s = self.engines[0], drain_s
        self.forced: ForcedExit | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.should_exit and sig == signal.SIGINT:  # uvicorn forces on this one
            log.warning("%s again: forcing the exit", name)
            for engine in self.engines:
                engine.force_stop(FORCED_REASON)
        else:
            for engine in self.engines:
                engine.drain(self.drain_s, why=name)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            await self._finish_forced()

    async def _finish_forced(self) -> None:
        """uvicorn skipped waiting for the connections and the app's shutdown: give the
        ended requests' answers a moment to go out, then stop the engine, each bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORCED_GRACE_S
        while self.server_state.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        try:  # the app's lifespan: the tokenizer threads, then the engine thread
            await asyncio.wait_for(self.lifespan.shutdown(), FORCED_STOP_S)
            stopped = all([await e.stop(timeout_s=0) for e in self.engines])  # threads ended
        except TimeoutError:
            stopped = False
        self.forced = ForcedExit(sum(e.open.forced or 0 for e in self.engines), stopped)
        log.warning("%s", self.forced.describe())
