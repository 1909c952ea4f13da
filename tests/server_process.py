"""``vtensor serve`` as a real subprocess on a free loopback port, for tests that need
their own process: signals, exit status, and timing that the test's threads (which
share one GIL with an in-process server) must not disturb."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[str]

    def stderr(self) -> str:
        """Everything the server wrote to stderr (call after it exited)."""
        return self.proc.stderr.read() if self.proc.stderr else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(*args: str, start_timeout: float = 90.0) -> Iterator[ServerProcess]:
    """Start ``vtensor serve --device cpu`` with ``args``; wait until /health answers 200.
    The process is killed at exit if the test left it running."""
    port = free_port()
    cmd = [sys.executable, "-m", "vtensor.cli", "serve", "--device", "cpu",
           "--port", str(port), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited at start: {proc.stderr.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield ServerProcess(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
