"""The server under bad input, a missing API key, disconnects, overload and shutdown.

Every case ends with the server still serving and its pool balancing.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .server_harness import Served, serve

openai = pytest.importorskip(
    "openai", reason="the openai client is not installed (pip install -e .[test])"
)


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve(server={"max_body_bytes": 64 * 1024}) as s:
        yield s


def _post(s: Served, path: str, body: Any, **kw: Any) -> requests.Response:
    if not isinstance(body, (dict, list)):  # raw bytes, text, or a generator (sent chunked)
        return requests.post(s.url + path, data=body, timeout=30, **kw)
    return requests.post(s.url + path, json=body, timeout=30, **kw)


def _metric(s: Served, name: str) -> float:
    text = requests.get(s.url + "/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


BAD = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", 422, None),  # JSON, but not an object
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 422, None),
    ("/v1/completions", {"prompt": [10**7], "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 422, None),
    ("/v1/completions", {"max_tokens": 2}, 422, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []},
     400, "tools"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input_gets_openai_error(
    server: Served, path: str, body: Any, status: int, param: str | None
) -> None:
    r = _post(server, path, body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    ok = _post(server, "/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]
    server.idle_and_balanced()


def test_prompt_over_context_is_400(server: Served) -> None:
    limit = server.engine.runtime.max_model_len
    r = _post(server, "/v1/completions", {"prompt": [5] * limit, "max_tokens": 1})
    assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


def test_prompt_plus_max_tokens_over_context_is_400(server: Served) -> None:
    """The engine's length rule, through HTTP (LLM.generate: test_engine): refuse, never
    trim; a request that exactly fills the context runs in full."""
    limit = server.engine.runtime.max_model_len
    prompt = [5] * (limit - 4)
    for path, body in (
        ("/v1/completions", {"prompt": prompt}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * limit}]}),
    ):
        r = _post(server, path, {**body, "max_tokens": limit})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] in ("max_tokens", "prompt", "messages") and str(limit) in err["message"]
    r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    ok = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    server.idle_and_balanced()


def test_body_limit_and_unknown_route(server: Served) -> None:
    big = json.dumps({"prompt": "x" * (80 * 1024)})
    headers = {"Content-Type": "application/json"}
    assert _post(server, "/v1/completions", big, headers=headers).status_code == 413
    # An upload in HTTP chunked transfer encoding has no Content-Length and is counted
    # as it arrives.
    parts = (big[i : i + 4096].encode() for i in range(0, len(big), 4096))
    assert _post(server, "/v1/completions", parts, headers=headers).status_code == 413
    r = requests.get(server.url + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    server.idle_and_balanced()


def test_disconnect_mid_stream_returns_memory(server: Served) -> None:
    before = _metric(server, 'vtensor_requests_finished_total{reason="abort"}')
    vocab = server.engine.model_config.vocab_size
    prompt = [random.randrange(2, vocab) for _ in range(random.randint(60, 120))]
    body = {"prompt": prompt, "max_tokens": 120, "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events: the request is running
        assert any(line.startswith(b"data: {") for line in got)
        assert _metric(server, "vtensor_kv_mapped_bytes") > 0
    deadline = time.monotonic() + 30
    while _metric(server, "vtensor_requests_running") > 0:
        assert time.monotonic() < deadline, "the aborted request kept running"
        time.sleep(0.05)
    assert _metric(server, "vtensor_kv_mapped_bytes") == 0
    assert _metric(server, 'vtensor_requests_finished_total{reason="abort"}') == before + 1
    server.idle_and_balanced()


def test_api_key_is_enforced_on_v1() -> None:
    key = f"sk-{random.randrange(10**12)}"
    with serve(server={"api_key": key}) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = requests.get(s.url + "/v1/models", headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=None, prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
        assert good.completions.create(model=None, prompt="hi", max_tokens=2).choices
        assert requests.get(s.url + "/health", timeout=30).status_code == 200
        s.idle_and_balanced()


def test_overload_queues_then_503() -> None:
    """One running slot and a queue of two: the fourth concurrent request is refused."""
    # Long generations on a model slowed to 10 ms a step (20 s each), so that the first
    # is still running when the others arrive; closing the streams aborts them all.
    with serve(max_num_seqs=1, max_model_len=2048, server={"max_waiting": 2}) as s:
        step = s.engine.step

        def slow_step() -> Any:
            time.sleep(0.01)
            return step()

        s.engine.step = slow_step  # type: ignore[method-assign]
        body = {"prompt": [3, 4, 5], "max_tokens": 2000, "stream": True, "ignore_eos": True}
        streams = [requests.post(s.url + "/v1/completions", json=body, stream=True, timeout=30)]
        first = streams[0].iter_lines()  # kept: dropping the iterator closes the connection
        next(first)  # running
        streams += [requests.post(s.url + "/v1/completions", json=body, stream=True, timeout=30)
                    for _ in range(2)]  # fmt: skip
        deadline = time.monotonic() + 30
        while _metric(s, "vtensor_requests_waiting") < 2:
            assert time.monotonic() < deadline, "the two extra requests were not queued"
            time.sleep(0.02)
        r = requests.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and "waiting" in r.json()["error"]["message"]
        for st in streams:
            st.close()
        s.idle_and_balanced()
        ok = requests.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
        s.idle_and_balanced()
