"""No request may stall the others (issue 18, defect 1).

A 10 MB text body once froze every client: it was tokenized on the event loop before
any length check (26.6 s to reject it, streams and ``/health`` stalled as long). Here a
real server process streams while such a body is refused, and the stream's gaps and
``/health``'s answers are timed; and a slow tokenizer shows that tokenizing runs on a
bounded set of worker threads, off the loop.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from .server_harness import Served, serve
from .server_process import ServerProcess, serve_process

STALL_S = 0.1  # the bound on a stream's gap and on /health while a big body is refused
BIG_BYTES = 10 * 10**6
ITERATIONS = 2  # per route, on one server; the whole file was also looped 20 times (git log)
ATTEMPTS = 3  # per iteration (see the test's docstring)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serve_process("--max-model-len", "2048", "--log-level", "warning") as s:
        yield s


def _big_text() -> str:
    """10 MB of English-like text (what the issue sent). Parsing its JSON is the one thing
    left on the event loop: ~10 ms here; text that is mostly outside ASCII or escaped
    costs up to ~5x more (docs/serving.md)."""
    words = ["memory", "virtual", "tensor", "chunk", "the", "GPU", "fast", "a", "of", "map"]
    piece = " ".join(random.choice(words) for _ in range(2000))
    return (piece * (BIG_BYTES // len(piece) + 1))[:BIG_BYTES]


def _big_body(route: str, text: str) -> tuple[str, bytes, str]:
    """(path, JSON body, the param the 400 must name) for a big text on ``route``."""
    if route == "completions":
        return "/v1/completions", json.dumps({"prompt": text, "max_tokens": 4}).encode(), "prompt"
    if route == "chat":
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
        return "/v1/chat/completions", json.dumps(body).encode(), "messages"
    return "/tokenize", json.dumps({"prompt": text}).encode(), "prompt"


class _Stream(threading.Thread):
    """A long streamed completion; records when each SSE event arrives."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.times: list[float] = []

    def run(self) -> None:
        body = {"prompt": [random.randrange(3, 400) for _ in range(8)], "max_tokens": 1800,
                "stream": True, "ignore_eos": True}  # fmt: skip
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
            # chunk_size=None: each HTTP chunk as it arrives (a fixed size would wait to fill).
            for part in r.iter_content(chunk_size=None):
                now = time.perf_counter()
                self.times += [now] * part.count(b"data: {")
                if self.stop.is_set() or b"[DONE]" in part:
                    return


class _Pinger(threading.Thread):
    """GET /health back to back; records (start, latency) of each."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.pings: list[tuple[float, float]] = []

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                t = time.perf_counter()
                assert session.get(self.url + "/health", timeout=60).status_code == 200
                self.pings.append((t, time.perf_counter() - t))
                time.sleep(0.01)


def _gaps_during(times: list[float], t0: float, t1: float) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times) if b >= t0 and a <= t1]


@dataclass
class _Measured:
    status: int
    body: dict[str, Any]
    took: float  # seconds to refuse the big text
    gap: float  # the stream's longest gap while it was refused
    health: float  # /health's slowest answer meanwhile
    base_gap: float  # the same two in the half second before it was sent: this machine's
    base_health: float  # pace under its current load, which the big body may add to

    @property
    def stalled(self) -> bool:
        """The big body added more than STALL_S to the stream's gap or /health's answer."""
        return self.gap > self.base_gap + STALL_S or self.health > self.base_health + STALL_S


def _refuse_big_text(url: str, path: str, body: bytes) -> _Measured:
    """One big text refused while a stream runs and /health is polled."""
    stream = _Stream(url)
    stream.start()
    deadline = time.monotonic() + 30
    while len(stream.times) < 20:  # the stream is running steadily
        assert stream.is_alive() and time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.01)
    pinger = _Pinger(url)
    pinger.start()
    t_base = time.perf_counter()
    time.sleep(0.5)  # the baseline: the stream's gaps and /health's answers before the body
    t0 = time.perf_counter()
    r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"},
                      timeout=120)  # fmt: skip
    t1 = time.perf_counter()
    time.sleep(0.1)
    pinger.stop.set()
    stream.stop.set()
    pinger.join(timeout=60)
    stream.join(timeout=60)
    gaps = _gaps_during(stream.times, t0, t1)
    pings = [lat for start, lat in pinger.pings if t0 - 0.05 <= start <= t1]
    base_gaps = [b - a for a, b in itertools.pairwise(stream.times) if t_base <= a and b < t0]
    base_pings = [lat for start, lat in pinger.pings if t_base <= start < t0 - 0.05]
    assert gaps and pings, "nothing was measured while the big body was refused"
    assert base_gaps and base_pings, "nothing was measured before the big body"
    return _Measured(
        r.status_code, r.json(), t1 - t0, max(gaps), max(pings), max(base_gaps), max(base_pings)
    )


@pytest.mark.parametrize("route", ["completions", "chat", "tokenize"])
def test_big_text_is_refused_without_stalling_others(server: ServerProcess, route: str) -> None:
    """Each iteration must add at most STALL_S to the stream's gaps and to /health's
    answers, over what they were in the half second before the body was sent. A stall is
    deterministic (the unfixed server stalls every attempt for seconds); the one thing
    left on the event loop, parsing the 10 MB of JSON, takes ~30-50 ms. The baseline is
    this machine's pace under its current load: a shared 2-core CI machine once saw
    gaps of 100-350 ms with a fixed server, against an absolute 100 ms bound. An attempt
    over the bound is repeated, up to ATTEMPTS times."""
    path, body, param = _big_body(route, _big_text())
    for _ in range(ITERATIONS):
        tries = []
        for _ in range(ATTEMPTS):
            m = _refuse_big_text(server.url, path, body)
            assert m.status == 400, m.body
            err = m.body["error"]
            assert err["code"] == 400 and err["param"] == param
            assert "max_model_len" in err["message"]
            assert m.took < 2.0, f"refusing a 10 MB text took {m.took:.1f}s"
            tries.append(m)
            if not m.stalled:
                break
        else:
            worst = [
                f"gap {t.gap * 1e3:.0f} ms (before: {t.base_gap * 1e3:.0f}), "
                f"/health {t.health * 1e3:.0f} ms (before: {t.base_health * 1e3:.0f})"
                for t in tries
            ]
            pytest.fail(f"the stream or /health stalled in every attempt: {worst}")


# ------------------------------------------------------- tokenizing off the event loop
WORKERS = 2
SLOW_S = 0.4


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve(server={"tokenizer_workers": WORKERS}) as s:
        yield s


class _SlowTokenizer:
    """Wraps a tokenizer's ``encode`` to sleep first, counting how many run at once."""

    def __init__(self, encode: Any) -> None:
        self.encode, self.lock = encode, threading.Lock()
        self.running = self.most = 0

    def __call__(self, *args: Any, **kwargs: Any) -> list[int]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(SLOW_S)
            return list(self.encode(*args, **kwargs))
        finally:
            with self.lock:
                self.running -= 1


ROUTES = [
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hello there"}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES)
def test_tokenizing_runs_off_the_event_loop(
    served: Served, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    tok = served.engine.tokenizer
    assert tok is not None
    slow = _SlowTokenizer(tok.encode)
    monkeypatch.setattr(tok, "encode", slow)
    answers: list[requests.Response] = []
    worker = threading.Thread(
        target=lambda: answers.append(requests.post(served.url + path, json=body, timeout=60))
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not slow.running:
        assert time.monotonic() < deadline and worker.is_alive(), "the tokenizer never ran"
        time.sleep(0.005)
    t = time.perf_counter()
    assert requests.get(served.url + "/health", timeout=30).status_code == 200
    health_s = time.perf_counter() - t
    worker.join(timeout=60)
    assert answers and answers[0].status_code == 200, answers[0].text if answers else "no answer"
    assert health_s < STALL_S, f"/health waited {health_s * 1e3:.0f} ms for a tokenizer"
    served.idle_and_balanced()


def test_tokenizer_workers_are_bounded(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = served.engine.tokenizer
    assert tok is not None
    slow = _SlowTokenizer(tok.encode)
    monkeypatch.setattr(tok, "encode", slow)
    n = 3 * WORKERS
    threads = [
        threading.Thread(
            target=requests.post,
            args=(served.url + "/tokenize",),
            kwargs={"json": {"prompt": f"text {i}"}, "timeout": 60},
        )
        for i in range(n)
    ]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    took = time.perf_counter() - t
    # All at once on the workers, never more: n requests take n / WORKERS rounds.
    assert slow.most == WORKERS, f"{slow.most} tokenizations ran at once, workers {WORKERS}"
    assert took >= (n / WORKERS) * SLOW_S * 0.9
    served.idle_and_balanced()
