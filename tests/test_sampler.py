"""Sampler: filters against brute force, penalties by hand, seeded reproducibility."""

from __future__ import annotations

import torch

from vtensor.engine.params import SamplingParams
from vtensor.engine.sampler import Sampler, SamplerRow, apply_penalties, filter_probs


def row(gen: torch.Generator | None = None, out: tuple[int, ...] = (), **kw) -> SamplerRow:
    return SamplerRow(SamplingParams(**kw), (0, 1), out, gen)


def test_top_k_top_p_min_p_keep_exactly_the_right_tokens() -> None:
    logits = torch.randn(3, 50)
    rows = [row(top_k=5), row(top_p=0.7), row(min_p=0.2)]
    kept = filter_probs(logits.clone(), rows).isfinite()
    assert set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    probs, order = logits[1].softmax(-1).sort(descending=True)
    n = int((probs.cumsum(-1) < 0.7).sum()) + 1  # the smallest prefix reaching 0.7
    assert set(kept[1].nonzero().flatten().tolist()) == set(order[:n].tolist())
    p = logits[2].softmax(-1)
    assert torch.equal(kept[2], p >= 0.2 * p.max())


def test_penalties_follow_vllm_semantics() -> None:
    logits = torch.randn(1, 10)
    r = row(out=(3, 3, 5), repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits.clone(), [r])[0]
    want = logits[0].clone()
    for t in (0, 1, 3, 5):  # prompt (0, 1) and output tokens: repetition penalty
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    want[3] -= 0.25 * 2 + 0.5  # output only: frequency x count + presence
    want[5] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(got, want)


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = torch.randn(4, 100)
    sampler = Sampler()

    def draw(seed: int, batch_rows: int) -> int:
        rows = [row(None, temperature=1.0) for _ in range(batch_rows)]
        rows[0] = row(torch.Generator().manual_seed(seed), temperature=1.0)
        return sampler(logits[:batch_rows], rows).tokens[0]

    tokens = [draw(7, b) for b in (1, 2, 4) for _ in range(3)]
    assert len(set(tokens)) == 1
    assert len({draw(s, 1) for s in range(20)}) > 1  # different seeds do differ


def test_draws_follow_the_distribution_and_greedy_takes_argmax() -> None:
    logits = torch.randn(1, 6) * 2
    sampler = Sampler()
    rows = [row(temperature=1.0)] * 4000
    counts = torch.bincount(torch.tensor(sampler(logits.expand(4000, 6), rows).tokens), minlength=6)
    assert (counts / 4000 - logits[0].softmax(-1)).abs().max() < 0.04
    assert sampler(logits, [row(temperature=0.0)]).tokens == [int(logits.argmax())]


def test_logprobs_are_the_raw_model_log_probabilities() -> None:
    logits = torch.randn(2, 30)
    res = Sampler()(logits, [row(temperature=0.0, logprobs=3), row(temperature=0.5)])
    ref = logits[0].log_softmax(-1)
    lp = res.logprobs[0]
    assert lp is not None and res.logprobs[1] is None
    assert set(lp) == set(ref.topk(3).indices.tolist()) | {res.tokens[0]}
    for t, v in lp.items():
        assert abs(v - float(ref[t])) < 1e-5
