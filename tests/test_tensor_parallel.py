"""Tensor parallelism on the CPU: gloo, two processes, tiny fp32 checkpoints.

The reference is the engine without the feature: the same checkpoint at
``tensor_parallel_size=1``. Greedy tokens must be identical and log-probs
within fp32 rounding (a row-parallel sum adds two partial products instead of
one, so they may differ in the last bits). Every TP engine checks after every
step that its worker's arena maps exactly the chunks rank 0's does.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.distributed import WorkerDiedError
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine

LOGPROB_ATOL = 1e-4
CASES = [  # arch, HF overrides, engine kwargs (chunked prefill, async, odd vocab, tying)
    ("llama", {"num_key_value_heads": 2}, {"max_num_batched_tokens": 16}),
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}, {}),
    ("qwen2", {"num_key_value_heads": 2}, {"async_scheduling": True}),
    ("qwen2", {"num_key_value_heads": 1, "vocab_size": 509}, {"max_num_batched_tokens": 16}),
    ("qwen3", {"num_key_value_heads": 2, "vocab_size": 511}, {}),
    ("qwen3", {"num_key_value_heads": 1}, {"async_scheduling": True}),
]


def outputs_of(llm: Any, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def assert_same_outputs(ref: list[Any], tp: list[Any]) -> None:
    for i, (a, b) in enumerate(zip(ref, tp, strict=True)):
        assert a.token_ids == b.token_ids, f"prompt {i}"
        assert a.finish_reason == b.finish_reason
        if a.logprobs is not None:
            ours = torch.tensor([lp[t] for lp, t in zip(b.logprobs, b.token_ids)])
            want = torch.tensor([lp[t] for lp, t in zip(a.logprobs, a.token_ids)])
            torch.testing.assert_close(ours, want, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize(("arch", "hf", "engine"), CASES, ids=lambda c: str(c))
def test_tp2_greedy_equals_tp1(
    arch: str, hf: dict[str, Any], engine: dict[str, Any], tmp_path: Path, make_llm
) -> None:
    make_checkpoint(tmp_path, arch, **hf)
    vocab = hf.get("vocab_size", 512)
    prompts = random_prompts(4, vocab)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    ref = outputs_of(make_llm(str(tmp_path), **engine), prompts, params)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, debug_check_every=1, **engine)
    assert tp.engine.model.shard.num_kv_heads == 1  # split (2 heads) or replicated (1)
    assert tp.engine.arena.layout.num_kv_heads == 1
    assert_same_outputs(ref, outputs_of(tp, prompts, params))


def test_tp2_sampling_penalties_and_preemption_equal_tp1(tmp_path: Path, make_llm) -> None:
    """Seeded sampling, penalties and top-k/p draw on rank 0 from the gathered logits;
    a KV pool too small for the batch preempts and recomputes, on every rank alike."""
    make_checkpoint(tmp_path, "qwen3")
    prompts = random_prompts(4, 512, lo=30, hi=40)
    seed = random.randrange(10_000)
    params = [
        SamplingParams(max_tokens=30, temperature=0.8, top_k=40, top_p=0.9, seed=seed + i,
                       ignore_eos=True, repetition_penalty=1.2 if i % 2 else 1.0)
        for i in range(len(prompts))
    ]  # fmt: skip
    small = dict(chunk_size=4096, kv_cache_bytes=16 * 4096, max_num_seqs=4)  # see test_models_hf
    ref = make_llm(str(tmp_path), **small)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, debug_check_every=1, **small)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tp.generate(prompts, params)]
    assert got == want, f"seed {seed}"
    assert tp.engine.stats().preemptions > 0


def test_a_model_that_cannot_split_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama", num_key_value_heads=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", tensor_parallel_size=3))
    make_checkpoint(tmp_path, "llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads 3: one must divide the other"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", tensor_parallel_size=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
        ({"tensor_parallel_size": 3, "nnodes": 2}, "must be a multiple of nnodes"),
        ({"nnodes": 2, "node_rank": 2}, "node_rank < nnodes"),
        ({"tensor_parallel_size": 2, "device": "cuda:1"}, "each rank uses cuda:<local rank>"),
        ({"master_port": 70000}, "is not a TCP port"),
        ({"distributed_timeout_s": 0}, "must be positive"),
    ],
)
def test_parallel_config_is_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_a_worker_killed_mid_generation_fails_the_engine_naming_its_rank(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama")
    engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", tensor_parallel_size=2))
    try:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        engine.add_requests(random_prompts(3, 512), params)
        for _ in range(random.randint(1, 5)):
            engine.step()
        [worker] = engine.workers.local if engine.workers else []
        os.kill(worker.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker rank 1 was killed by SIGKILL") as err:
            for _ in range(200):  # fewer steps than the requests need: it must fail first
                engine.step()
        assert err.value.rank == 1
        assert time.monotonic() - t0 < 10, "the death took too long to surface"
        with pytest.raises(WorkerDiedError, match="rank 1"):
            engine.step()  # and every later call, at once
    finally:
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 10, "close() waited on the dead worker"
    assert engine.pool.closed
