"""Two models on one shared KV pool on the GPU: interleaved steps in bf16 with CUDA
graphs and async scheduling give each model's tokens alone; two engine threads on a
pool too small for both peaks trade chunks and still give each model's tokens.

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.greedy_walk import assert_greedy_close
from tests.test_multimodel import (
    assert_leases_hold,
    each_alone,
    generate_on_threads,
    greedy,
    run_interleaved,
    token_ids,
)
from vtensor import SharedKVPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CHUNK = 2 << 20
# 8 layers x 8 KV heads x 32 dims x K,V: 8 KiB/token in bf16 (256 tokens per 2 MiB
# chunk), 16 KiB in fp32 (128 tokens).
OVER: dict[str, Any] = dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                            hidden_size=256, head_dim=32, max_position_embeddings=1024)  # fmt: skip


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    paths = []
    for arch in ("llama", "qwen2"):
        path = tmp_path_factory.mktemp(arch)
        make_checkpoint(path, arch, **OVER)
        paths.append(str(path))
    return paths


def test_interleaved_bf16_graphs_match_each_model_alone(
    two_checkpoints: list[str], make_llm: Callable[..., Any]
) -> None:
    common = dict(device="cuda", dtype="bfloat16", max_num_seqs=8)
    budget = 64 * CHUNK  # ample: each model's schedule is the one it has alone
    prompts = [random_prompts(8, 512, 50, 400), random_prompts(8, 512, 50, 400)]
    alone = token_ids(
        each_alone(make_llm, two_checkpoints, prompts, greedy(64), kv_cache_bytes=budget, **common)
    )
    pool = SharedKVPool(budget, device="cuda")
    shared = [make_llm(p, kv_pool=pool, **common) for p in two_checkpoints]
    for llm in shared:
        rt = llm.engine.runtime
        assert rt.use_cuda_graphs and rt.async_scheduling and rt.dtype == torch.bfloat16
        assert llm.engine.runner.graphs is not None
    got = run_interleaved([s.engine for s in shared], prompts, 64)
    assert got == alone
    assert alone[0] != alone[1]
    assert pool.budget is not None and pool.budget.violations() == []


def test_two_engine_threads_trade_chunks_on_a_tight_pool(
    two_checkpoints: list[str], make_llm: Callable[..., Any]
) -> None:
    """fp32, compared by ``tests/greedy_walk.py``: preemption regroups the batches, and
    other GEMM shapes may flip a near-tie. Each request holds up to 4 chunks; 8 per
    model need 32 at the peak, the pool has 40."""
    common = dict(device="cuda", dtype="float32", max_num_seqs=8)
    budget = 40 * CHUNK
    prompts = [random_prompts(8, 512, 200, 380), random_prompts(8, 512, 200, 380)]
    params = greedy(100, logprobs=2)
    alone = each_alone(make_llm, two_checkpoints, prompts, params, kv_cache_bytes=budget, **common)
    pool = SharedKVPool(budget, device="cuda")
    shared = [make_llm(p, kv_pool=pool, **common) for p in two_checkpoints]
    got = generate_on_threads(shared, prompts, params, timeout=300)
    for i, (a, b) in enumerate(zip(got, alone)):
        assert_greedy_close(a, b, f"model {i}: shared pool on threads vs alone")
    assert_leases_hold(pool, shared)
