"""Shutdown of a real ``vtensor serve`` process (issue 18, defects 3 and 4).

- SIGINT or SIGTERM drains: running streams get ``--shutdown-timeout`` seconds, then
  end with ``finish_reason: "abort"`` and ``[DONE]``; the process exits 0.
- The drain deadline is set once: a supervisor repeating SIGTERM does not push it back.
- A second Ctrl-C forces the exit: every open stream still gets an error event and
  ``[DONE]``, a waiting non-streamed request a 503, and the process exits non-zero,
  saying so in its log.
"""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from typing import Any

import pytest
import requests

from .server_harness import serve
from .server_process import ServerProcess, serve_process


class _Stream(threading.Thread):
    """A long streamed completion, its events kept with their arrival times."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[float, bytes]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": [random.randrange(3, 400) for _ in range(6)], "max_tokens": 2000,
                "stream": True, "ignore_eos": True}  # fmt: skip
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True,
                               timeout=60) as r:  # fmt: skip
                for line in r.iter_lines():
                    if line:
                        self.events.append((time.monotonic(), line))
        except requests.RequestException as exc:  # a stream cut without its end
            self.error = exc

    def wait_running(self) -> None:
        deadline = time.monotonic() + 30
        while len(self.events) < 3:
            assert self.is_alive() and time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.01)

    def last(self, n: int) -> list[bytes]:
        return [line for _, line in self.events[-n:]]


def _event(line: bytes) -> dict[str, Any]:
    assert line.startswith(b"data: {"), line
    return json.loads(line[len(b"data: ") :])


def _exit(server: ServerProcess, timeout: float = 60) -> tuple[int, str]:
    code = server.proc.wait(timeout=timeout)
    return code, server.stderr()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_then_exits_cleanly(sig: signal.Signals) -> None:
    """A signal mid-stream: the stream ends properly, the process exits 0 and says so."""
    with serve_process("--max-model-len", "2048", "--shutdown-timeout", "0.3") as server:
        stream = _Stream(server.url)
        stream.start()
        stream.wait_running()
        server.proc.send_signal(sig)
        stream.join(timeout=60)
        code, err = _exit(server)
    assert code == 0, err
    assert "Traceback" not in err and "shut down cleanly" in err, err
    # The grace period (0.3 s) ends long before 2000 tokens: the stream still ends properly.
    assert stream.error is None and stream.last(1) == [b"data: [DONE]"]
    assert _event(stream.last(2)[0])["choices"][0]["finish_reason"] == "abort"
    assert "draining" in err and "aborting 1 request" in err, err


def test_drain_deadline_is_set_once() -> None:
    with serve() as s:
        before = time.monotonic()
        s.runner.drain(30.0)
        first = s.runner.drain_deadline
        assert first is not None and before + 30.0 <= first <= time.monotonic() + 30.0
        time.sleep(0.05)
        s.runner.drain(30.0)
        assert s.runner.drain_deadline == first  # the same deadline, not 50 ms later
        s.runner.drain(0.0)
        assert s.runner.drain_deadline == first  # nor an earlier one
        r = requests.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 503
        s.idle_and_balanced()


def test_repeated_sigterm_does_not_extend_the_drain() -> None:
    """SIGTERM at t0 with a 2 s drain, again at t0 + 1.2 s: the stream is aborted at
    t0 + 2 s (the unfixed server: t0 + 3.2 s), and the log says how long was left."""
    timeout, again = 2.0, 1.2
    with serve_process("--max-model-len", "2048", "--shutdown-timeout", str(timeout)) as server:
        stream = _Stream(server.url)
        stream.start()
        stream.wait_running()
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(again)
        server.proc.send_signal(signal.SIGTERM)
        stream.join(timeout=60)
        code, err = _exit(server)
    assert code == 0, err
    assert stream.last(1) == [b"data: [DONE]"], stream.error
    ended = stream.events[-2][0] - t0  # the abort event
    assert _event(stream.events[-2][1])["choices"][0]["finish_reason"] == "abort"
    # Fixed: ~timeout. Unfixed: no earlier than timeout + again (the deadline moved when
    # the second signal came); the margin below that is for a busy machine.
    assert timeout - 0.2 < ended < timeout + again - 0.3, f"aborted {ended:.2f}s after SIGTERM"
    left = re.search(r"already draining; ([0-9.]+) s left", err)
    assert left, err
    assert float(left.group(1)) == pytest.approx(timeout - again, abs=0.4)


def test_second_interrupt_forces_exit_and_ends_every_stream() -> None:
    with serve_process("--max-model-len", "2048", "--shutdown-timeout", "60") as server:
        streams = [_Stream(server.url) for _ in range(3)]
        for st in streams:
            st.start()
        for st in streams:
            st.wait_running()
        plain: list[requests.Response] = []
        body = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True}
        waiter = threading.Thread(target=lambda: plain.append(
            requests.post(server.url + "/v1/completions", json=body, timeout=60)))  # fmt: skip
        waiter.start()
        time.sleep(0.3)  # the non-streamed request is running too
        server.proc.send_signal(signal.SIGINT)  # drain: 60 s, far longer than this test
        time.sleep(0.5)
        assert all(st.is_alive() for st in streams), "the drain ended the streams early"
        server.proc.send_signal(signal.SIGINT)  # forced
        code, err = _exit(server, timeout=30)
        for st in streams:
            st.join(timeout=30)
        waiter.join(timeout=30)
    assert code != 0, err
    assert "forced" in err and "shut down cleanly" not in err, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    for st in streams:
        assert st.error is None, st.error  # each stream ended, not cut
        assert st.last(1) == [b"data: [DONE]"]
        error = _event(st.last(2)[0])["error"]
        assert error["code"] == 503 and "forced" in error["message"]
    assert plain and plain[0].status_code == 503, plain
    assert "forced" in plain[0].json()["error"]["message"]
