"""A real vtensor server on a loopback port, in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.server.app import ServerConfig, build_app
from vtensor.server.async_engine import AsyncEngine

from .conftest import assert_engine_balanced


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    engine: LLMEngine
    runner: AsyncEngine

    def idle_and_balanced(self, timeout: float = 30.0) -> None:
        """Wait until no request is left, then check the pool against the books."""
        deadline = time.monotonic() + timeout
        while self.runner.call_blocking(self.engine.has_unfinished):
            assert time.monotonic() < deadline, "requests still running after the test"
            time.sleep(0.05)
        self.runner.call_blocking(lambda: assert_engine_balanced(self.engine))
        left = list(self.engine.requests)
        assert not left, f"finished requests were not popped: {left}"


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn on a free loopback port, in a daemon thread;
    yields its URL and stops it (graceful, 2 s) on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "the server did not shut down"


@contextmanager
def serve(server: dict[str, Any] | None = None, **engine: Any) -> Iterator[Served]:
    """Start the embedded model (CPU, small context) behind a real uvicorn on port 0."""
    engine.setdefault("device", "cpu")
    engine.setdefault("max_model_len", 256)
    llm_engine = LLMEngine(EngineConfig(**engine))
    app = build_app(ServerConfig(port=0, **(server or {})), llm_engine)
    pool = llm_engine.pool
    with uvicorn_thread(app) as url:
        yield Served(url, llm_engine, app.state.engine)
    assert pool.closed, "shutdown did not close the engine's pool"
