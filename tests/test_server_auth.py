"""``--api-key`` (issue 18, defect 5): every route that computes needs the key, checked
before the body is read; ``/health`` and ``/metrics`` stay open unless
``--protect-metrics``."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .server_harness import Served, serve

KEY = f"sk-{random.randrange(10**12)}"
GOOD = {"Authorization": f"Bearer {KEY}"}
BAD_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": KEY},  # no scheme
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Bearer {KEY}x"},
]
COMPUTE = [
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/vtensor-embedded-tiny-llama", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/redoc", None),
    ("GET", "/no/such/route", None),  # a key-less client learns nothing about routes
]  # fmt: skip


@pytest.fixture(scope="module")
def keyed() -> Iterator[Served]:
    with serve(server={"api_key": KEY}) as s:
        yield s


def _call(s: Served, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return requests.request(method, s.url + path, json=body, headers=headers, timeout=60)


def _assert_401(r: requests.Response) -> None:
    assert r.status_code == 401, (r.status_code, r.text[:200])
    assert r.headers.get("www-authenticate") == "Bearer"
    err = r.json()["error"]
    assert err["code"] == 401 and err["type"] == "authentication_error" and err["message"]


@pytest.mark.parametrize(("method", "path", "body"), COMPUTE)
def test_every_computing_route_needs_the_key(
    keyed: Served, method: str, path: str, body: Any
) -> None:
    for headers in BAD_HEADERS:
        _assert_401(_call(keyed, method, path, body, headers))
    r = _call(keyed, method, path, body, GOOD)
    assert r.status_code == (404 if path == "/no/such/route" else 200), r.text[:200]
    keyed.idle_and_balanced()


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "hi", "max_tokens": ', b"\xff\xfe not json", b'{"prompt": "\\ud800"}', b"[]"],
)
def test_key_is_checked_before_the_body_is_read(keyed: Served, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        _assert_401(requests.post(keyed.url + path, data=raw, headers=headers, timeout=60))
        r = requests.post(keyed.url + path, data=raw, headers={**headers, **GOOD}, timeout=60)
        assert r.status_code in (400, 422), r.text  # with the key: the body's own error


def test_key_is_checked_before_a_big_body_arrives(keyed: Served) -> None:
    """A key-less upload is refused from its headers: the 8 MB body is never waited for."""
    body = b'{"prompt": "' + b"x" * (8 * 2**20) + b'"}'
    t = time.perf_counter()
    r = requests.post(keyed.url + "/v1/completions", data=body, timeout=60,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    _assert_401(r)
    assert time.perf_counter() - t < 5.0


def test_health_and_metrics_stay_open(keyed: Served) -> None:
    assert requests.get(keyed.url + "/health", timeout=30).status_code == 200
    assert requests.get(keyed.url + "/metrics", timeout=30).status_code == 200


def test_protect_metrics_needs_the_key_for_metrics_only() -> None:
    with serve(server={"api_key": KEY, "protect_metrics": True}) as s:
        for headers in BAD_HEADERS:
            _assert_401(requests.get(s.url + "/metrics", headers=headers, timeout=30))
        r = requests.get(s.url + "/metrics", headers=GOOD, timeout=30)
        assert r.status_code == 200 and "vtensor_requests_running" in r.text
        assert requests.get(s.url + "/health", timeout=30).status_code == 200
        s.idle_and_balanced()


def test_protect_metrics_without_a_key_is_refused() -> None:
    from vtensor.server.app import ServerConfig

    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(protect_metrics=True)
