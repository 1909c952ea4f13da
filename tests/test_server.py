"""The OpenAI server on loopback, driven by the official ``openai`` client.

Greedy results are checked against the offline engine (same embedded weights),
and after every test the server must be idle with its pool balancing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from vtensor import SamplingParams

from .server_harness import Served, serve

openai = pytest.importorskip(
    "openai", reason="the openai client is not installed (pip install -e .[test])"
)


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve() as s:
        yield s


@pytest.fixture(autouse=True)
def balanced(server: Served) -> Iterator[None]:
    yield
    server.idle_and_balanced()


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(server: Served) -> Iterator[Any]:
    from vtensor import LLM

    with LLM(device="cpu", max_model_len=256) as llm:
        yield llm


def _words(n: int) -> str:
    vocab = ["memory", "virtual", "tensor", "page", "chunk", "map", "the", "a", "GPU", "fast"]
    return " ".join(random.choice(vocab) for _ in range(n))


def _ids(n: int, vocab: int) -> list[int]:
    return [random.randrange(2, vocab) for _ in range(n)]


def test_completion_greedy_matches_offline_engine(client: openai.OpenAI, offline: Any) -> None:
    prompts = [_words(random.randint(2, 12)) for _ in range(3)]
    max_tokens = random.randint(4, 12)
    got = client.completions.create(
        model=client.models.list().data[0].id, prompt=prompts, max_tokens=max_tokens,
        temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))  # fmt: skip
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, want in zip(got.choices, ref):
        assert choice.token_ids == want.outputs[0].token_ids
        assert choice.text == want.outputs[0].text
        assert choice.finish_reason == "length"
    assert got.usage.completion_tokens == 3 * max_tokens
    assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)


def test_token_id_prompts_single_and_batch(client: openai.OpenAI, server: Served) -> None:
    vocab = server.engine.model_config.vocab_size
    single = _ids(random.randint(3, 20), vocab)
    one = client.completions.create(model=None, prompt=single, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert one.usage.prompt_tokens == len(single) and one.usage.completion_tokens == 5
    batch = [_ids(random.randint(3, 20), vocab) for _ in range(2)]
    many = client.completions.create(model=None, prompt=batch, max_tokens=5, temperature=0, n=2,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == sum(map(len, batch))  # once per prompt, whatever n
    # Greedy samples of one prompt agree; sample 0 of a batch equals the same prompt alone.
    assert many.choices[0].text == many.choices[1].text


def test_streaming_completion_equals_non_streaming(client: openai.OpenAI) -> None:
    prompt, max_tokens = _words(6), random.randint(8, 20)
    kw: dict[str, Any] = dict(model=None, prompt=prompt, max_tokens=max_tokens, temperature=0)
    full = client.completions.create(**kw)
    events = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ev.choices[0].text for ev in events if ev.choices)
    assert text == full.choices[0].text
    finals = [ev.choices[0].finish_reason for ev in events if ev.choices]
    finals = [f for f in finals if f is not None]
    assert finals == [full.choices[0].finish_reason]
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == full.usage.completion_tokens
    # Every chunk, the usage one included, is a whole ``text_completion`` of one stream.
    assert {(c.object, c.model) for c in events} == {("text_completion", full.model)}
    assert len({c.id for c in events}) == 1 and len({c.created for c in events}) == 1


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=None, prompt=_words(5), max_tokens=12, temperature=1.0,
                              seed=random.randrange(10**6), n=2)  # fmt: skip
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_stop_string_is_cut_in_both_modes(client: openai.OpenAI) -> None:
    """The random-weight model often emits bytes that are not valid UTF-8 (U+FFFD in the
    text), so the stop string may be made of them (tests/test_output_processor.py)."""
    prompt = _words(8)
    base = client.completions.create(model=None, prompt=prompt, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    text = base.choices[0].text
    if len(text) < 6:
        pytest.fail(f"the model produced too little text to cut: {text!r}")
    stop = text[3:6]
    at = text.find(stop)
    # The cut requests ignore EOS too, so they generate the same tokens as ``base``.
    kw: dict[str, Any] = dict(model=None, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                              extra_body={"ignore_eos": True})  # fmt: skip
    cut = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert cut.choices[0].text == text[:at]
    assert streamed == text[:at]  # the held-back tail never streamed the stop string
    assert cut.choices[0].finish_reason == "stop"


def test_chat_streaming_and_not(client: openai.OpenAI, server: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": _words(5)}]
    full = client.chat.completions.create(model=None, messages=messages, max_tokens=10,
                                          temperature=0)  # fmt: skip
    assert full.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(
        model=None, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content
    assert stream[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert {(c.object, c.model) for c in stream} == {("chat.completion.chunk", full.model)}
    assert len({c.id for c in stream}) == 1 and stream[-2].choices[0].finish_reason is not None
    import requests

    tok = requests.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert tok["count"] == full.usage.prompt_tokens


def test_logprobs(client: openai.OpenAI) -> None:
    k = random.randint(1, 4)
    got = client.completions.create(model=None, prompt=_words(4), max_tokens=6, logprobs=k,
                                    temperature=0)  # fmt: skip
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token_lp, tops in zip(lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and token_lp >= max(tops.values()) - 1e-5  # greedy: the top one
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True,
        top_logprobs=k, temperature=0,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(1 <= len(c.top_logprobs) <= k + 1 for c in content)


def test_models_health_tokenize_roundtrip(client: openai.OpenAI, server: Served) -> None:
    import requests

    [card] = client.models.list().data
    assert card.id == server.engine.runtime.model_name
    assert requests.get(server.url + "/health").status_code == 200
    text = _words(7)
    ids = requests.post(server.url + "/tokenize", json={"prompt": text,
                        "add_special_tokens": False}).json()["tokens"]  # fmt: skip
    back = requests.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert back == text


def test_metrics_count_what_was_served(client: openai.OpenAI, server: Served) -> None:
    import re

    import requests

    def scrape() -> dict[str, float]:
        text = requests.get(server.url + "/metrics", timeout=30).text
        for line in text.splitlines():  # the exposition format: HELP, TYPE, then samples
            assert line.startswith("# ") or re.fullmatch(r"vtensor_\S+ [-+0-9.e]+", line), line
        return {k: float(v) for k, v in re.findall(r"^(vtensor_\S+) (\S+)$", text, re.M)}

    before = scrape()
    n, max_tokens = random.randint(2, 4), random.randint(3, 8)
    client.completions.create(model=None, prompt=[_words(3)] * n, max_tokens=max_tokens,
                              extra_body={"ignore_eos": True})  # fmt: skip
    server.idle_and_balanced()
    after = scrape()
    ttft, tpot = "vtensor_time_to_first_token_seconds", "vtensor_time_per_output_token_seconds"
    assert after[f"{ttft}_count"] - before[f"{ttft}_count"] == n
    assert after[f"{tpot}_count"] - before[f"{tpot}_count"] == n
    assert after[f'{ttft}_bucket{{le="+Inf"}}'] == after[f"{ttft}_count"]
    made = after["vtensor_generation_tokens_total"] - before["vtensor_generation_tokens_total"]
    assert made == n * max_tokens
    done = 'vtensor_requests_finished_total{reason="length"}'
    assert after[done] - before[done] == n
    assert (
        after["vtensor_kv_chunks_free"] + after["vtensor_kv_chunks_in_use"]
        == after["vtensor_kv_chunks_capacity"]
    )
    assert after["vtensor_requests_running"] == 0 and after["vtensor_kv_live_bytes"] == 0
