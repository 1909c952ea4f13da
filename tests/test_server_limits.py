"""The model card, the length rule when the KV pool is small, and unexpected errors
(issue 18, defect 5).

- ``GET /v1/models/{id}`` answers the card, or an OpenAI-shaped 404.
- ``max_model_len`` as served is what one request can hold: the configured context, or
  less when the KV pool cannot give one request that many tokens. ``/v1/models``
  advertises it, a request without ``max_tokens`` may fill it, and longer requests get
  a 400 naming it.
- An unexpected error answers a generic message with an id; the details (exception,
  traceback) go to the log under the same id.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .server_harness import Served, serve

openai = pytest.importorskip(
    "openai", reason="the openai client is not installed (pip install -e .[test])"
)

# The embedded model keeps 1 KiB of KV per token (fp32 on the CPU): with 4 KiB chunks a
# chunk holds 4 tokens, and a pool of 17 chunks (one is the scratch slot's) gives one
# request at most 64 tokens, a quarter of the 256-token context.
TOKENS_PER_CHUNK = 4
POOL_TOKENS = 64


@pytest.fixture(scope="module")
def small_pool() -> Iterator[Served]:
    with serve(max_model_len=256, chunk_size=4096, kv_cache_bytes=17 * 4096) as s:
        yield s


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve() as s:
        yield s


def test_model_card_and_unknown_model(server: Served) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    card = client.models.retrieve(name)
    assert card.id == name and card.object == "model"
    assert requests.get(f"{server.url}/v1/models/{name}", timeout=30).json()["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    r = requests.get(server.url + "/v1/models/gpt-9", timeout=30)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == 404 and err["param"] == "model" and "gpt-9" in err["message"]


def test_served_length_is_what_the_pool_holds(small_pool: Served) -> None:
    s = small_pool
    [card] = requests.get(s.url + "/v1/models", timeout=30).json()["data"]
    assert card["max_model_len"] == POOL_TOKENS
    tok = requests.post(s.url + "/tokenize", json={"prompt": "hi"}, timeout=30).json()
    assert tok["max_model_len"] == POOL_TOKENS
    # No max_tokens: the request may fill what one request can hold, and it does.
    body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    r = requests.post(s.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == POOL_TOKENS
    assert r.json()["choices"][0]["finish_reason"] == "length"
    s.idle_and_balanced()


def test_over_what_the_pool_holds_is_400_naming_the_limit(small_pool: Served) -> None:
    s = small_pool
    n = random.randint(4, 20)
    prompt = [random.randrange(3, 400) for _ in range(n)]
    for body, param in (
        ({"prompt": prompt, "max_tokens": POOL_TOKENS - n + 1}, "max_tokens"),
        ({"prompt": [5] * POOL_TOKENS, "max_tokens": 1}, "prompt"),
    ):
        r = requests.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and str(POOL_TOKENS) in err["message"], err
        assert "KV pool" in err["message"]
    ok = {"prompt": prompt, "max_tokens": POOL_TOKENS - n, "ignore_eos": True}
    r = requests.post(s.url + "/v1/completions", json=ok, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == POOL_TOKENS - n
    s.idle_and_balanced()


SECRET = "secret-detail-7f3a"


def _boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError(SECRET)


def test_unexpected_error_is_generic_for_the_client_and_detailed_in_the_log(
    server: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tok = server.engine.tokenizer
    assert tok is not None
    monkeypatch.setattr(tok, "encode", _boom)
    caplog.set_level(logging.ERROR, logger="vtensor")
    for headers in ({}, {"X-Request-Id": "client-id-42"}):
        r = requests.post(server.url + "/tokenize", json={"prompt": "hi"}, headers=headers,
                          timeout=30)  # fmt: skip
        assert r.status_code == 500
        err = r.json()["error"]
        assert SECRET not in r.text and "RuntimeError" not in r.text, r.text
        assert err["type"] == "internal_server_error" and err["code"] == 500
        found = re.search(r"request id ([\w-]+)", err["message"])
        assert found, err["message"]
        if headers:
            assert found.group(1) == "client-id-42"
        logged = [rec for rec in caplog.records if found.group(1) in rec.getMessage()]
        assert logged and logged[0].exc_info is not None, caplog.text
        assert SECRET in caplog.text
    server.idle_and_balanced()


def test_unexpected_error_mid_stream_ends_it_generically(
    server: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from vtensor.server import serving_completion

    monkeypatch.setattr(serving_completion, "_stream_choice", _boom)
    caplog.set_level(logging.ERROR, logger="vtensor")
    body = {"prompt": [5, 6, 7], "max_tokens": 50, "stream": True, "ignore_eos": True}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert SECRET not in r.text and "RuntimeError" not in r.text, r.text
    err = requests.models.complexjson.loads(events[-2][len("data: ") :])["error"]
    assert err["code"] == 500
    rid = re.search(r"request id ([\w-]+)", err["message"])
    assert rid and rid.group(1).startswith("cmpl-"), err
    assert SECRET in caplog.text and rid.group(1) in caplog.text
    server.idle_and_balanced()  # the stream's request was aborted, its KV returned
