"""SLO-aware admission on the GPU: a late short request behind two long-running ones gets
one of them swapped out for it (VMM chunks to pinned host memory and back, CUDA-graph
decode, async scheduling), and every greedy output walks with the roomy engine's
(fp32; ``tests/greedy_walk.py``: a near-tie may flip between batchings).

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.gpu_delays import CHUNK, OVER
from tests.greedy_walk import assert_greedy_close
from tests.test_slo_engine import late_short_request
from vtensor import SamplingParams
from vtensor.engine.request import Request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# OVER in fp32: 32 KiB per token, 64 tokens per 2 MiB chunk. Two long requests of
# 300-380 + 160 tokens end at 8-9 chunks each: a pool of 20 chunks holds both to the
# end, but not also a 100-token prompt (2 chunks + headroom).
KW = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=1024,
          async_scheduling=True, enable_prefix_caching=False)  # fmt: skip
LONG_NEW, SHORT_NEW = 160, 16


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)


def as_outputs(reqs: list[Request]) -> list[Any]:
    """Requests in the shape ``assert_greedy_close`` walks (``RequestOutput``-like)."""
    return [
        SimpleNamespace(outputs=[SimpleNamespace(token_ids=r.output_ids, logprobs=r.logprobs)])
        for r in reqs
    ]


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_slo_swap_out_on_cuda_walks_with_the_roomy_engine(
    eager: bool, tmp_path: Path, make_llm: Any
) -> None:
    make_checkpoint(tmp_path, "llama", **OVER)
    longs = random_prompts(2, 512, lo=300, hi=380)
    (short,) = random_prompts(1, 512, lo=100, hi=101)
    kw = dict(KW, enforce_eager=eager)
    roomy = make_llm(str(tmp_path), kv_cache_bytes=256 * CHUNK, **kw)
    want = roomy.generate([*longs, short], [params(LONG_NEW)] * 2 + [params(SHORT_NEW)])
    llm = make_llm(
        str(tmp_path),
        kv_cache_bytes=20 * CHUNK,
        swap_space_bytes=64 * CHUNK,
        ttft_slo_ms=1000,
        tpot_slo_ms=1000,
        debug_check_every=1,
        **kw,
    )
    assert (llm.engine.runner.graphs is None) == eager
    got = late_short_request(llm, longs, short, params(LONG_NEW), params(SHORT_NEW))
    assert_greedy_close(as_outputs(got), want, "SLO swap vs roomy")
    s = llm.engine.stats()
    assert s.slo_swap_outs >= 1 and s.host_tier_used_chunks == 0
    assert s.swap_in_bytes == s.swap_out_bytes > 0
    assert s.slo_ttft_met == s.slo_ttft_requests == 3
