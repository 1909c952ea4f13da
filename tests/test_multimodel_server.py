"""One server, two models on one shared KV pool (CPU): requests route by ``model``,
``/v1/models`` lists both, an unknown model is an OpenAI-shaped 404, ``/metrics``
labels each model's samples."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.shared_pool import SharedKVPool
from vtensor.server.app import ServerConfig, build_app
from vtensor.server.routing import label_metrics

from .conftest import assert_engine_balanced
from .server_harness import uvicorn_thread

CHUNK = 4096
NAMES = ("tiny-llama", "tiny-qwen")
ENGINE: dict[str, Any] = dict(device="cpu", chunk_size=CHUNK, max_model_len=128)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    for arch in ("llama", "qwen2"):
        path = tmp_path_factory.mktemp(arch)
        make_checkpoint(path, arch)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def served(paths: list[Path]) -> Iterator[tuple[str, list[LLMEngine], list[Any]]]:
    pool = SharedKVPool(96 * CHUNK, device="cpu")
    engines = [
        LLMEngine(EngineConfig(model=str(p), **ENGINE), kv_pool=pool, name=n)
        for p, n in zip(paths, NAMES)
    ]
    app = build_app(ServerConfig(port=0, served_model_names=NAMES), engines)
    with uvicorn_thread(app) as url:
        yield url, engines, app.state.engines
    assert all(e.pool.closed for e in engines)
    assert pool.budget is not None and pool.budget.unallocated == pool.budget.total


@pytest.fixture(autouse=True)
def balanced(served: tuple[str, list[LLMEngine], list[Any]]) -> Iterator[None]:
    yield
    _, engines, runners = served
    for engine, runner in zip(engines, runners):
        deadline = time.monotonic() + 30
        while runner.call_blocking(engine.has_unfinished):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        runner.call_blocking(lambda e=engine: assert_engine_balanced(e))


def test_models_lists_both_and_unknown_is_openai_404(served: Any) -> None:
    url = served[0]
    data = requests.get(url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == list(NAMES)
    for name in NAMES:
        assert requests.get(f"{url}/v1/models/{name}", timeout=30).json()["id"] == name
    chat = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in (
        ("/v1/models/gpt-9", None),
        ("/v1/completions", {"model": "gpt-9", "prompt": [5, 6], "max_tokens": 2}),
        ("/v1/chat/completions", chat),
    ):
        if body is None:
            r = requests.get(url + path, timeout=30)
        else:
            r = requests.post(url + path, json=body, timeout=30)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == 404 and err["param"] == "model" and "gpt-9" in err["message"]
        assert all(repr(n) in err["message"] for n in NAMES)


def test_requests_route_by_model_to_each_models_own_tokens(served: Any, paths: list[Path]) -> None:
    """Concurrent requests to both models give each model's offline greedy tokens."""
    url = served[0]
    prompts = random_prompts(4, 512, 3, 50)
    max_tokens = random.randint(4, 12)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = {}
    from vtensor import LLM

    for path, name in zip(paths, NAMES):
        with LLM(str(path), **ENGINE) as llm:
            expected[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert expected[NAMES[0]] != expected[NAMES[1]]
    got: dict[tuple[str, int], Any] = {}

    def ask(name: str, i: int) -> None:
        body = {"model": name, "prompt": prompts[i], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        r = requests.post(url + "/v1/completions", json=body, timeout=60)
        got[(name, i)] = r

    threads = [threading.Thread(target=ask, args=(n, i)) for n in NAMES for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, i), r in got.items():
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == name
        assert out["choices"][0]["token_ids"] == expected[name][i], (name, i)
    tok = requests.post(url + "/tokenize", json={"model": NAMES[1], "prompt": "hi"}, timeout=30)
    assert tok.status_code == 200 and tok.json()["tokens"]


def test_metrics_label_each_model(served: Any) -> None:
    url = served[0]
    body = requests.get(url + "/metrics", timeout=30).text
    for name in NAMES:
        assert re.search(rf'^vtensor_requests_running\{{model="{name}"\}} 0', body, re.M), body
    families = re.findall(r"^# TYPE (\S+)", body, re.M)
    assert len(families) == len(set(families)), "a metric family is declared twice"


def test_label_metrics_merges_families() -> None:
    a = '# HELP x X\n# TYPE x gauge\nx 1\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_sum 3\n'
    b = '# HELP x X\n# TYPE x gauge\nx 5\n# TYPE h histogram\nh_bucket{le="1"} 7\nh_sum 8\n'
    out = label_metrics([("a", a), ("b", b)]).splitlines()
    assert out == [
        "# HELP x X", "# TYPE x gauge", 'x{model="a"} 1', 'x{model="b"} 5',
        "# TYPE h histogram", 'h_bucket{model="a",le="1"} 2', 'h_sum{model="a"} 3',
        'h_bucket{model="b",le="1"} 7', 'h_sum{model="b"} 8',
    ]  # fmt: skip


def test_vtensor_serve_two_models_in_one_process_and_a_clean_shutdown(paths: list[Path]) -> None:
    """The command line: ``--model`` twice with their ``--served-model-name``s, one
    process; a request to each, then SIGINT drains both engines and exits 0."""
    from .server_process import serve_process

    args = []
    for path, name in zip(paths, NAMES):
        args += ["--model", str(path), "--served-model-name", name]
    with serve_process(*args, "--max-model-len", "128", "--kv-cache-gib", "0.01") as s:
        data = requests.get(s.url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in data] == list(NAMES)
        for name in NAMES:
            body = {"model": name, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
            r = requests.post(s.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        r = requests.post(s.url + "/v1/completions", json={**body, "model": "x"}, timeout=30)
        assert r.status_code == 404
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=60) == 0, s.stderr()
        assert "shut down cleanly" in s.stderr()


def test_vtensor_serve_refuses_names_that_do_not_match_the_models(paths: list[Path]) -> None:
    cmd = [sys.executable, "-m", "vtensor.cli", "serve", "--device", "cpu", "--model",
           str(paths[0]), "--model", str(paths[1]), "--served-model-name", "one"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "1 --served-model-name for 2 --model" in done.stderr
