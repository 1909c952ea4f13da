"""Swapping on the GPU: preempted requests' private VMM chunks copied to pinned host
memory on the side copy stream and back into fresh chunks at the same offsets, read
by CUDA-graph decode and the Triton kernels under async scheduling. fp32: token-
identical to the same engine recomputing and to a never-preempted one. With every
copy delayed ~20 ms on the copy stream, or every forward pass delayed ~20 ms on the
compute stream, the outputs stay identical: no step reads a chunk whose copy-in is in
flight, no copy-out reads KV a step in flight is still writing, and no chunk is
unmapped before its copy-out.

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.gpu_delays import CHUNK, OVER, slow_copy, slow_forward, spin_cycles_for
from tests.greedy_walk import assert_greedy_close
from vtensor import SamplingParams
from vtensor.engine import swap as swap_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# OVER in fp32: 32 KiB per token, 64 tokens per 2 MiB chunk. A pool of 24 chunks (1536
# tokens) for 8 requests of up to ~460 tokens forces preemption; roomy engines get 256
# chunks.
KW = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=1024,
          async_scheduling=True, debug_check_every=1)  # fmt: skip
NEW = 160  # prompts of 200-300 tokens grow by 2-3 chunks each: preemption is certain


def greedy(llm: Any, prompts: list[list[int]]) -> list[Any]:
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=2)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("prefix", [False, True], ids=["nocache", "cache"])
def test_swap_is_token_identical_on_cuda(
    eager: bool, prefix: bool, tmp_path: Path, make_llm: Any
) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    prompts = random_prompts(8, 512, lo=200, hi=300)
    kw = dict(KW, enforce_eager=eager, enable_prefix_caching=prefix)
    want = greedy(make_llm(str(tmp_path), kv_cache_bytes=256 * CHUNK, **kw), prompts)
    recompute = make_llm(str(tmp_path), kv_cache_bytes=24 * CHUNK, **kw)
    assert_greedy_close(greedy(recompute, prompts), want, "recompute vs roomy")
    assert recompute.engine.stats().preemptions > 0
    llm = make_llm(
        str(tmp_path),
        kv_cache_bytes=24 * CHUNK,
        swap_space_bytes=64 * CHUNK,
        preemption_mode="swap",
        **kw,
    )
    assert (llm.engine.runner.graphs is None) == eager
    assert_greedy_close(greedy(llm, prompts), want, "swap vs roomy")
    s = llm.engine.stats()
    assert s.swap_preemptions > 0
    assert s.host_tier_used_chunks == s.host_tier_spilled_chunks  # only spilled prefixes
    if not prefix:
        assert s.swap_out_bytes > 0 and s.swap_in_bytes == s.swap_out_bytes


@pytest.mark.parametrize("slow", ["copies", "forward"])
def test_slowed_copies_or_steps_are_never_read_stale(
    slow: str, tmp_path: Path, make_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``copies``: every run of chunks lands ~20 ms after it is queued on the copy
    stream: a forward pass that did not wait for its copy-in would read the fresh
    chunks' old contents (another request's KV, or zeros). ``forward``: every forward
    pass starts ~20 ms late on the compute stream, so under async scheduling the step
    that writes a victim's last KV is still running when its copy-out is queued: a
    copy that did not wait for the compute stream would save stale KV (and an unmap
    that did not wait for the copy would free chunks still being read)."""
    make_checkpoint(tmp_path, "llama", **OVER)
    prompts = random_prompts(8, 512, lo=200, hi=300)
    kw = dict(KW, enable_prefix_caching=False)
    want = greedy(make_llm(str(tmp_path), kv_cache_bytes=256 * CHUNK, **kw), prompts)
    cycles = spin_cycles_for(0.02)
    if slow == "copies":
        monkeypatch.setattr(swap_module, "copy_bytes", slow_copy(cycles))
    llm = make_llm(
        str(tmp_path),
        kv_cache_bytes=24 * CHUNK,
        swap_space_bytes=64 * CHUNK,
        preemption_mode="swap",
        **kw,
    )
    if slow == "forward":
        slow_forward(llm.engine.runner, cycles, monkeypatch)
    assert_greedy_close(greedy(llm, prompts), want, "swap vs roomy")
    s = llm.engine.stats()
    assert s.swap_preemptions > 0
    assert s.swap_in_bytes > 0 and s.swap_in_bytes == s.swap_out_bytes


def test_cost_model_rates_are_measured_on_cuda(tmp_path: Path, make_llm: Any) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    llm = make_llm(str(tmp_path), kv_cache_bytes=24 * CHUNK, swap_space_bytes=8 * CHUNK, **KW)
    cost = llm.engine.swap.planner.cost
    assert 1e9 < cost.copy_bytes_per_s < 1e12  # PCIe/NVLink-C2C: GB/s to ~1 TB/s
    assert 1e12 < cost.flops_per_s < 1e16
    assert cost.mode is None
