"""Prefix caching over HTTP: ``usage.prompt_tokens_details.cached_tokens`` (OpenAI's
shape) in completions and chat, streamed or not; ``POST /reset_prefix_cache``; and
the prefix-cache counters of ``/metrics``."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator

import pytest

from .server_harness import Served, serve

openai = pytest.importorskip("openai", reason="the openai client is not installed")
requests = pytest.importorskip("requests", reason="requests is not installed")

BLOCK = 4  # the embedded model: 1 KiB per token (fp32) in 4 KiB chunks


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve(server={"api_key": "sesame"}, chunk_size=4096) as s:
        yield s


@pytest.fixture(autouse=True)
def balanced(server: Served) -> Iterator[None]:
    yield
    server.idle_and_balanced()  # resets the cache: every test starts cold


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)


def ids(n: int) -> list[int]:
    return [random.randrange(2, 480) for _ in range(n)]


def cached(usage: object) -> int:
    details = usage.prompt_tokens_details  # type: ignore[attr-defined]
    return details.cached_tokens


def test_completions_report_cached_prompt_tokens(client: openai.OpenAI) -> None:
    prompt = ids(10 * BLOCK + 2)
    kw = {"model": None, "max_tokens": 3, "temperature": 0}
    first = client.completions.create(prompt=prompt, **kw)  # type: ignore[call-overload]
    assert cached(first.usage) == 0
    again = client.completions.create(prompt=prompt, **kw)  # type: ignore[call-overload]
    assert cached(again.usage) == 10 * BLOCK  # whole blocks, at most prompt - 1 tokens
    assert again.choices[0].text == first.choices[0].text
    stream = client.completions.create(  # type: ignore[call-overload]
        prompt=[*prompt, 7, 8], stream=True, stream_options={"include_usage": True}, **kw
    )
    usage = [e.usage for e in stream if e.usage is not None]
    assert len(usage) == 1 and cached(usage[0]) == 10 * BLOCK
    # n samples and a batch: each prompt counts once, with what all its samples reused.
    other = ids(3 * BLOCK + 1)
    batch = client.completions.create(prompt=[prompt, other], n=2, **kw)  # type: ignore[call-overload]
    assert cached(batch.usage) == 10 * BLOCK + 0  # `other`'s samples start in one step


def test_chat_reports_cached_prompt_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "memory " * 40}, {"role": "user", "content": "hi"}]
    kw = {"model": client.models.list().data[0].id, "messages": messages, "max_tokens": 2}
    first = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert cached(first.usage) == 0
    again = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    prompt = again.usage.prompt_tokens
    assert cached(again.usage) == (prompt - 1) // BLOCK * BLOCK > 0
    events = client.chat.completions.create(  # type: ignore[call-overload]
        stream=True, stream_options={"include_usage": True}, **kw
    )
    usage = [e.usage for e in events if e.usage is not None]
    assert cached(usage[0]) == cached(again.usage)


def test_reset_prefix_cache_route(client: openai.OpenAI, server: Served) -> None:
    prompt = ids(6 * BLOCK + 1)
    kw = {"model": None, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    client.completions.create(**kw)  # type: ignore[call-overload]
    url = server.url + "/reset_prefix_cache"
    assert requests.post(url, timeout=30).status_code == 401  # the API key guards it
    auth = {"Authorization": "Bearer sesame"}
    resp = requests.post(url, headers=auth, timeout=30)
    assert resp.status_code == 200 and resp.json() == {"success": True}
    assert cached(client.completions.create(**kw).usage) == 0  # type: ignore[call-overload]
    # While a request runs: 409, and the cache keeps what it had.
    long = client.completions.create(  # type: ignore[call-overload]
        model=None, prompt=ids(8), max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    first = next(iter(long))
    assert first.choices
    busy = requests.post(url, headers=auth, timeout=30)
    assert busy.status_code == 409 and "running" in busy.json()["error"]["message"]
    done = threading.Thread(target=lambda: [None for _ in long])
    done.start()
    done.join(60)
    assert cached(client.completions.create(**kw).usage) == 6 * BLOCK


def test_metrics_count_prefix_cache_queries_and_hits(client: openai.OpenAI, server: Served) -> None:
    def scrape() -> dict[str, float]:
        text = requests.get(server.url + "/metrics", timeout=30).text
        found = re.finditer(r"^vtensor_(prefix_cache_\w+) (\S+)$", text, re.M)
        return {m.group(1): float(m.group(2)) for m in found}

    before = scrape()
    prompt = ids(8 * BLOCK + 1)
    for _ in range(3):
        client.completions.create(model=None, prompt=prompt, max_tokens=2)  # type: ignore[call-overload]
    after = scrape()
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    assert queries == 3 * len(prompt) and hits == 2 * 8 * BLOCK
    assert 0 < after["prefix_cache_hit_rate"] <= 1
    assert after["prefix_cache_chunks"] >= 8
    assert after["prefix_cache_bytes"] == after["prefix_cache_chunks"] * 4096
