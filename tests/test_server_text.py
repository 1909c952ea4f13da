"""Strict text validation (issue 18, defect 2): a lone surrogate (JSON ``"\\ud800"``) is
not text. Wherever a string enters, it gets a 400 in OpenAI's error shape, naming the
field, and never a 500. Then a property test throws arbitrary JSON, strings and bytes at
every route: whatever comes in, no answer is a 5xx and every error is OpenAI-shaped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .server_harness import Served, serve

LONE = ["\ud800", "\udfff", "ok\udc00ok", "\udbff tail"]


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    # A short context keeps the generated requests that do run quick on the CPU.
    with serve(max_model_len=128, max_num_batched_tokens=512) as s:
        yield s


def _send(s: Served, method: str, path: str, body: Any = None, raw: bytes | None = None,
          headers: dict[str, str] | None = None) -> requests.Response:  # fmt: skip
    """``body`` as JSON the way Python writes it: lone surrogates as ``\\uXXXX`` escapes."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return requests.request(method, s.url + path, data=data, headers=hdrs, timeout=120)


def _msg(content: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content, **extra}], "max_tokens": 2}


def _part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _cases(bad: str) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body, the param the 400 must name) with ``bad`` in each string field."""
    return [
        ("/v1/completions", {"prompt": bad, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", bad], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": bad, "max_tokens": 2}, "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": ["x", bad], "max_tokens": 2}, "stop"),
        ("/v1/completions", {"prompt": "hi", "model": bad, "max_tokens": 2}, "model"),
        ("/v1/completions", {"prompt": "hi", "user": bad, "max_tokens": 2}, "user"),
        ("/v1/completions", {"prompt": "hi", bad: 1}, None),  # an unknown key
        ("/v1/chat/completions", _msg(bad), "messages.0.content"),
        ("/v1/chat/completions", _msg([{"type": "text", "text": "a"}, _part(bad)]),
         "messages.0.content"),
        ("/v1/chat/completions", _msg("hi", name=bad), "messages.0.name"),
        ("/v1/chat/completions", {"messages": [{"role": bad, "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {**_msg("hi"), "stop": [bad]}, "stop"),
        ("/v1/chat/completions", {**_msg("hi"), "model": bad}, "model"),
        ("/tokenize", {"prompt": bad}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ("/tokenize", {"prompt": "hi", "model": bad}, "model"),
        ("/detokenize", {"tokens": [5], "model": bad}, "model"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_cases("x"))))
def test_lone_surrogate_is_400_naming_the_field(server: Served, case: int) -> None:
    path, body, param = _cases(random.choice(LONE))[case]
    r = _send(server, "POST", path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert "Unicode" in err["message"], err
    if param is not None:
        assert err["param"] and err["param"].startswith(param), err
    # Nothing was lost: the server still answers, and the pool balances.
    ok = _send(server, "POST", "/v1/completions", {"prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    server.idle_and_balanced()


def test_valid_unicode_everywhere_is_accepted(server: Served) -> None:
    """The check refuses only what is not text: pairs, astral and non-ASCII text pass."""
    text = "é 日本 🙂 \U0010fffd " + "".join(chr(random.randint(0x20, 0xD7FF)) for _ in range(4))
    parts = [{"type": "text", "text": text}, {"type": "text", "text": text}]
    for path, body in [
        ("/v1/completions", {"prompt": text, "max_tokens": 2}),
        ("/v1/completions", {"prompt": [text, text], "max_tokens": 2, "stop": [text]}),
        ("/v1/completions", {"prompt": "hi", "stop": text, "user": text, "max_tokens": 2}),
        ("/v1/chat/completions", _msg(text, name=text)),
        ("/v1/chat/completions", _msg(parts)),
        ("/tokenize", {"prompt": text}),
        ("/tokenize", {"messages": [{"role": "user", "content": parts}]}),
    ]:
        r = _send(server, "POST", path, body)
        assert r.status_code == 200, (path, r.text)
    server.idle_and_balanced()


# --------------------------------------------------------------- the property test
def _text() -> st.SearchStrategy[str]:
    """Text over every code point, weighted towards what breaks things: lone surrogates
    (hypothesis leaves surrogates out by default, and two in a row may pair up into one
    valid character in JSON), ASCII, and the rest of Unicode."""
    every = st.characters(categories=None, exclude_categories=[])
    pieces = st.one_of(
        st.sampled_from(LONE), st.text(st.characters(max_codepoint=0x7F), max_size=8),
        st.text(every, max_size=8),
    )  # fmt: skip
    return st.lists(pieces, max_size=4).map("".join)


def _json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-5, 300),
        st.floats(allow_nan=True, allow_infinity=True), _text(),
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(st.one_of(_text(), st.sampled_from(FIELDS)), inner, max_size=5)
        ),
        max_leaves=20,
    )


# fmt: off
FIELDS = ["model", "prompt", "messages", "role", "content", "type", "text", "name", "max_tokens",
          "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
          "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stream", "stream_options", "include_usage",
          "return_token_ids", "tokens", "add_special_tokens", "add_generation_prompt",
          "skip_special_tokens", "include_stop_str_in_output", "user"]
# fmt: on

# Near-valid bodies reach deeper than random dictionaries: each route's own fields, each
# with a valid value or an arbitrary one.
GOOD: dict[str, Any] = {
    "prompt": st.one_of(_text(), st.lists(st.integers(0, 600), max_size=8)),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "developer"]),
                "content": st.one_of(
                    _text(),
                    st.lists(
                        st.fixed_dictionaries({"type": st.just("text"), "text": _text()}),
                        max_size=3,
                    ),
                ),
            }
        ),
        max_size=3,
    ),
    "max_tokens": st.integers(1, 8),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "tokens": st.lists(st.integers(-3, 600), max_size=8),
    "stop": st.lists(_text(), max_size=3),
    "logprobs": st.integers(0, 3),
    "temperature": st.floats(0, 2),
}
ROUTE_FIELDS = {
    "/v1/completions": ["prompt", "max_tokens", "n", "stream", "stop", "logprobs", "temperature"],
    "/v1/chat/completions": ["messages", "max_tokens", "n", "stream", "stop", "temperature"],
    "/tokenize": ["prompt", "messages"],
    "/detokenize": ["tokens"],
}


@st.composite
def _body(draw: st.DrawFn, path: str) -> Any:
    kind = draw(st.sampled_from(["any", "near", "near"]))
    if kind == "any":
        return draw(_json())
    keys = draw(st.lists(st.sampled_from(ROUTE_FIELDS[path]), unique=True, min_size=1))
    body = {k: draw(st.one_of(GOOD[k], GOOD[k], _json())) for k in keys}
    if draw(st.booleans()):
        body[draw(st.sampled_from(FIELDS))] = draw(_json())
    return body


def _check(r: requests.Response) -> None:
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
        assert "Traceback" not in err["message"]
    elif "text/event-stream" in r.headers.get("content-type", ""):
        lines = [ln for ln in r.text.split("\n\n") if ln]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path", list(ROUTE_FIELDS))
@SETTINGS
@given(data=st.data())
def test_no_json_body_gets_a_500(server: Served, path: str, data: st.DataObject) -> None:
    body = data.draw(_body(path))
    _check(_send(server, "POST", path, raw=json.dumps(body).encode()))


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models"]
)
@SETTINGS
@given(raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_no_bytes_get_a_500(server: Served, path: str, raw: bytes, ctype: str) -> None:
    r = _send(server, "POST", path, raw=raw, headers={"Content-Type": ctype})
    _check(r)


@SETTINGS
@given(segment=_text(), method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_no_path_gets_a_500(server: Served, segment: str, method: str) -> None:
    quoted = requests.utils.quote(segment.encode("utf-8", "surrogatepass"), safe="")
    for path in (f"/v1/models/{quoted}", f"/{quoted}", f"/v1/{quoted}"):
        _check(_send(server, method, path))


def test_server_is_balanced_after_the_storm(server: Served) -> None:
    server.idle_and_balanced()
