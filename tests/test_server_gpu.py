"""The server with the engine on the GPU: the engine thread replays CUDA graphs
captured on the main thread, and the mapper maps chunks while HTTP requests stream.

Plain ``requests`` (no ``openai`` client) so that this runs on the device image as is.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import requests
import torch

from vtensor import SamplingParams

from .server_harness import serve

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_server_greedy_equals_offline_and_frees_on_disconnect(make_llm) -> None:
    kw = dict(device="cuda", dtype="float32", max_model_len=1024)
    prompts = [[random.randrange(2, 400) for _ in range(random.randint(5, 200))] for _ in range(4)]
    max_tokens = random.randint(20, 60)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    offline = make_llm(**kw)
    # One prompt at a time on both sides: the same batch shapes, so the same numerics.
    want = [offline.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    with serve(**kw) as s:
        assert s.engine.runtime.use_cuda_graphs
        for p, ids in zip(prompts, want):
            body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            r = requests.post(s.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == ids
        s.idle_and_balanced()
        _concurrent_streams_with_one_disconnect(s.url)
        s.idle_and_balanced()


def _concurrent_streams_with_one_disconnect(url: str) -> None:
    finished: list[str] = []

    def stream(close_early: bool) -> None:
        body = {"prompt": [random.randrange(2, 400) for _ in range(300)], "max_tokens": 300,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as r:
            for i, line in enumerate(r.iter_lines()):
                if close_early and i > 10:
                    return
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["finish_reason"]:
                        finished.append(choice["finish_reason"])

    threads = [threading.Thread(target=stream, args=(i == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert finished == ["length"] * 7
