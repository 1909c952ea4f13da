"""A prompt past 100k tokens on the Llama-3.1-8B shape: it runs, or is refused at admission.

At 110,000 tokens a layer's K rows lie up to 110,000 × 65,536 elements (7.2e9,
over 3 × 2^31) into the slot, so every kernel's offsets must be 64-bit: before
the fix the extend kernel read out of bounds past 32,767 tokens and killed the
CUDA context. The kernels' numbers at these offsets are checked against fp32
references in ``test_kernels_offsets.py``; here the whole engine runs it.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtensor import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPT_TOKENS = 110_000


def test_prompt_past_100k_tokens_runs_on_llama31_8b_shape(make_llm) -> None:
    llm = make_llm(shape="llama3.1-8b", device="cuda", max_num_seqs=4)
    engine = llm.engine
    assert engine.runtime.max_model_len == 131072
    assert (PROMPT_TOKENS - 1) * engine.arena.layout.token_stride > 3 * 2**31
    vocab = engine.model_config.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    out = llm.generate([prompt], params)[0].outputs[0]
    assert len(out.token_ids) == 8 and all(0 <= t < vocab for t in out.token_ids)
    assert out.logprobs is not None
    chosen = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert all(math.isfinite(x) and x <= 0 for x in chosen), chosen

    # The model's whole context leaves no room to generate: refused before anything runs.
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([prompt + prompt[:21_072]], SamplingParams(max_tokens=1))
