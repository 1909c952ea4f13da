"""Preemption by recompute under async scheduling, on the CPU, in the geometry of
``test_swap_gpu.py``'s recompute engine (64-token chunks, a pool of 24, 8 prompts of
200-300 tokens growing by 160): greedy tokens equal those of the same engine with a
pool large enough never to preempt, prefix cache on and off.

The GPU run of that test diverged (H100, 2026-11-22); on the CPU the steps do not
overlap, so this checks the scheduling and bookkeeping half of that path (which
spans, preemptions, admissions and KV commands each step carries), not the device's
ordering. Every step is integrity-checked.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoints import random_prompts
from vtensor import SamplingParams

CHUNK = 64 << 10  # the embedded model in fp32: 1 KiB per token, 64 tokens per chunk
NEW = 160


def greedy(llm: Any, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("prefix", [False, True], ids=["nocache", "cache"])
def test_async_recompute_preemption_matches_never_preempted(make_llm: Any, prefix: bool) -> None:
    prompts = random_prompts(8, 480, lo=200, hi=300)
    kw = dict(
        dtype="float32",
        chunk_size=CHUNK,
        max_num_seqs=8,
        max_model_len=1024,
        async_scheduling=True,
        enable_prefix_caching=prefix,
    )
    roomy = make_llm(kv_cache_bytes=256 * CHUNK, **kw)
    want = greedy(roomy, prompts)
    assert roomy.engine.stats().preemptions == 0
    tight = make_llm(kv_cache_bytes=24 * CHUNK, debug_check_every=1, **kw)
    assert tight.engine.runtime.async_scheduling
    assert greedy(tight, prompts) == want
    assert tight.engine.stats().preemptions > 0
