"""The sleep routes on a real server (CPU): ``POST /sleep?level=N``, ``POST /wake_up``,
``GET /is_sleeping``; a completion while asleep gets 503 in OpenAI's error shape and
queues nothing, and the same request succeeds after the wake with the same tokens;
sleeping while a request runs is 409 and drops nothing; the API key guards them all."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from .server_harness import Served, serve

requests = pytest.importorskip("requests", reason="requests is not installed")
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve(server={"api_key": KEY}, enable_sleep_mode=True, chunk_size=4096) as s:
        yield s


def post(server: Served, path: str, **kw: Any) -> Any:
    return requests.post(server.url + path, headers=AUTH, timeout=60, **kw)


def is_sleeping(server: Served) -> bool:
    resp = requests.get(server.url + "/is_sleeping", headers=AUTH, timeout=30)
    assert resp.status_code == 200
    return bool(resp.json()["is_sleeping"])


def complete(server: Served, prompt: list[int], **extra: Any) -> Any:
    body = {"model": None, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}
    return post(server, "/v1/completions", json=body)


def weights_bytes(server: Served) -> float:
    text = requests.get(server.url + "/metrics", timeout=30).text
    found = re.search(r"^vtensor_memory_weights_bytes (\S+)$", text, re.M)
    assert found, "no weights gauge in /metrics"
    return float(found.group(1))


def test_routes_need_the_key(server: Served) -> None:
    for method, path in (("post", "/sleep"), ("post", "/wake_up"), ("get", "/is_sleeping")):
        resp = getattr(requests, method)(server.url + path, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == 401
    assert not is_sleeping(server)  # the refused /sleep did nothing


@pytest.mark.parametrize("level", [1, 2])
def test_503_while_asleep_then_the_same_request_succeeds(server: Served, level: int) -> None:
    prompt = [random.randrange(2, 200) for _ in range(random.randint(5, 40))]
    awake = complete(server, prompt)
    assert awake.status_code == 200
    resp = post(server, "/sleep", params={"level": level})
    assert resp.status_code == 200 and resp.content == b""
    assert is_sleeping(server)
    assert weights_bytes(server) == 0  # /metrics answers while asleep: nothing held
    for stream in (False, True):
        refused = complete(server, prompt, stream=stream)
        assert refused.status_code == 503
        err = refused.json()["error"]
        assert err["type"] == "service_unavailable" and "asleep" in err["message"]
    assert not server.runner.call_blocking(lambda: list(server.engine.requests))
    again = post(server, "/sleep", params={"level": 3 - level})
    assert again.status_code == 409 and "asleep" in again.json()["error"]["message"]
    assert server.runner.call_blocking(lambda: server.engine.sleep_mode.level) == level
    assert post(server, "/wake_up").status_code == 200
    assert not is_sleeping(server)
    assert weights_bytes(server) == server.engine.weights.region.nbytes
    woke = complete(server, prompt)
    assert woke.status_code == 200
    assert woke.json()["choices"][0]["text"] == awake.json()["choices"][0]["text"]
    assert post(server, "/wake_up").status_code == 200  # awake: nothing to do
    server.idle_and_balanced()


@pytest.mark.parametrize("level", ["0", "3", "two", "1.5"])
def test_bad_level_is_400(server: Served, level: str) -> None:
    resp = post(server, "/sleep", params={"level": level})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "level"
    assert not is_sleeping(server)


def test_sleep_while_a_request_runs_is_409_and_drops_nothing(server: Served) -> None:
    body = {
        "model": None, "prompt": [5, 6, 7], "max_tokens": 150, "temperature": 0,
        "stream": True, "ignore_eos": True,
    }  # fmt: skip
    with requests.post(
        server.url + "/v1/completions", headers=AUTH, json=body, stream=True, timeout=60
    ) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith(b"data: ")
        busy = post(server, "/sleep")
        assert busy.status_code == 409 and "unfinished" in busy.json()["error"]["message"]
        assert not is_sleeping(server)
        rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    server.idle_and_balanced()


def test_server_without_sleep_mode_says_so() -> None:
    with serve() as s:
        resp = requests.post(s.url + "/sleep", timeout=30)
        assert resp.status_code == 400 and "enable_sleep_mode" in resp.json()["error"]["message"]
        assert requests.get(s.url + "/is_sleeping", timeout=30).json() == {"is_sleeping": False}


def test_concurrent_completions_around_sleep_lose_nothing(server: Served) -> None:
    """Completions racing a sleep each end as 200 (ran before it) or 503 (refused), or
    the sleep gets 409; no request is half processed."""
    results: list[int] = []
    prompt = [random.randrange(2, 200) for _ in range(8)]

    def client() -> None:
        results.append(complete(server, prompt).status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    slept = post(server, "/sleep")
    for t in threads:
        t.join(60)
    assert slept.status_code in (200, 409)
    assert set(results) <= {200, 503} and len(results) == 6
    assert post(server, "/wake_up").status_code == 200
    server.idle_and_balanced()
