"""The unified memory pool on the GPU: the workspace table measured at warm-up, and a
tight budget that deflates mid-run (CUDA graphs, async scheduling, fp32), whose greedy
outputs match a roomy static engine's (``greedy_walk``: fp32 GPU rounding may differ
across batchings) with every chunk accounted for (integrity every step) and the
device's memory within the budget: the eager steps' workspace is the pool's chunks
(``TorchWorkspace``), so the KV's and the workspace's chunks together never exceed
the one budget, exactly.

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.greedy_walk import assert_greedy_close
from vtensor import SamplingParams
from vtensor.engine.warmup import warm_up

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# 8 layers x 8 KV heads x 64 dims x K,V x fp32: 32 KiB of KV per token, 64 tokens per
# 2 MiB chunk; a wide MLP makes the workspace of a 2048-token step tens of chunks.
OVER = dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
            hidden_size=512, head_dim=64, intermediate_size=4096,
            max_position_embeddings=2048)  # fmt: skip
CHUNK = 2 << 20
KW = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=1024,
          max_num_batched_tokens=2048, async_scheduling=True)  # fmt: skip
NEW = 160
KV_SHARE = 24  # the static split's KV chunks in the tight budget


def greedy(llm: Any, prompts: list[list[int]]) -> list[Any]:
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    return llm.generate(prompts, params)


def test_the_table_is_measured_at_warm_up(tmp_path: Path, make_llm: Any) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    llm = make_llm(str(tmp_path), unified_memory_pool=True, kv_cache_bytes=512 * CHUNK, **KW)
    estimate = llm.engine.scheduler.memory.planner.table
    assert estimate.source == "estimated"
    warm_up(llm.engine)
    memory = llm.engine.scheduler.memory
    table = memory.planner.table
    assert table.source == "measured"
    assert [t for t, _ in table.points] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    needs = [b for _, b in table.points]
    assert needs == sorted(needs) and needs[-1] > needs[0] >= 0
    # A 2048-token step's MLP alone holds [2048, 4096] fp32 tensors (32 MiB each).
    assert table.bytes_for(2048) >= 2048 * 4096 * 4
    assert llm.engine.kv.capacity_chunks == memory.kv_capacity
    llm.engine.check_integrity()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_tight_unified_pool_deflates_and_stays_within_budget(
    eager: bool, tmp_path: Path, make_llm: Any
) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    kw = dict(KW, enforce_eager=eager, enable_prefix_caching=True)
    prompts = random_prompts(8, 512, lo=200, hi=300)
    want = greedy(make_llm(str(tmp_path), kv_cache_bytes=512 * CHUNK, **kw), prompts)
    probe = make_llm(str(tmp_path), unified_memory_pool=True, kv_cache_bytes=512 * CHUNK, **kw)
    warm_up(probe.engine)
    reserve = probe.engine.scheduler.memory.planner.table.chunks_for(2048)
    budget = KV_SHARE + reserve  # the static split of this budget leaves KV_SHARE chunks
    llm = make_llm(str(tmp_path), unified_memory_pool=True, debug_check_every=1,
                   kv_cache_bytes=(budget + 1) * CHUNK, **kw)  # fmt: skip
    engine = llm.engine
    warm_up(engine)
    assert (engine.runner.graphs is None) == eager
    memory = engine.scheduler.memory
    workspace = engine.runner.workspace
    assert workspace is not None  # on CUDA the workspace is the pool's chunks
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    rids = [engine.add_request(p, params)[0] for p in prompts]
    over = borrowed = most_workspace = 0
    while engine.has_unfinished():
        engine.step()
        torch.cuda.synchronize()
        # Exact: the KV and the workspace are both the pool's chunks.
        over = max(over, engine.pool.stats().created - engine.scratch_chunks - memory.budget)
        borrowed = max(borrowed, memory.snapshot(engine.kv).borrowed)
        most_workspace = max(most_workspace, workspace.held_chunks)
    got = [engine.pop(r) for r in rids]
    assert [r.num_output for r in got] == [NEW] * len(prompts)  # none lost, none cut
    m = engine.memory_stats()
    assert m.kv_deflates > 0 and m.kv_inflates > 0
    assert m.workspace_pool_bytes is not None  # reported with the pool-backed workspace
    assert borrowed > 0  # the KV held more than the static split's share at some step
    assert over <= 0, f"KV + workspace exceeded the budget by {over} chunks"
    assert most_workspace > 0  # eager steps really allocated from the pool
    llm2 = make_llm(str(tmp_path), unified_memory_pool=True, kv_cache_bytes=(budget + 1) * CHUNK,
                    **kw)  # fmt: skip
    warm_up(llm2.engine)
    assert_greedy_close(greedy(llm2, prompts), want, "unified (tight) vs static (roomy)")
