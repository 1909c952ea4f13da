"""The token counters on the CPU engine (``EngineStats.computed_tokens``,
``prefill_tokens``, ``recomputed_prompt_tokens``), against a reference built from
the requests' own transitions: each preemption by recompute records how many tokens
the request had computed, and its next life computes again every one of them it
reaches (no prefix cache: it restarts at token 0). A swap recomputes nothing; a run
never preempted prefills each prompt once."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.checkpoints import random_prompts
from tests.test_swap_engine import CHUNK, NEW, TIGHT, greedy_tokens
from vtensor.engine.request import Request


class Lives:
    """Per request: the tokens computed at each preemption by recompute, and at the end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.preempted: dict[int, list[int]] = {}
        self.final: dict[int, int] = {}
        preempt, finish = Request.preempt, Request.finish

        def spy_preempt(req: Request) -> None:
            self.preempted.setdefault(req.rid, []).append(req.num_computed)
            preempt(req)

        def spy_finish(req: Request, *args: Any, **kwargs: Any) -> None:
            self.final[req.rid] = req.num_computed
            finish(req, *args, **kwargs)

        monkeypatch.setattr(Request, "preempt", spy_preempt)
        monkeypatch.setattr(Request, "finish", spy_finish)

    def recomputed(self) -> int:
        """Tokens a later life computed again: up to where it got (the next preemption,
        or the end), at most the most any earlier life had computed."""
        total = 0
        for rid, computed in self.preempted.items():
            reached = [*computed[1:], self.final[rid]]
            most = 0
            for before, end in zip(computed, reached):
                most = max(most, before)
                total += min(end, most)
        return total


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_recompute_counts_each_re_prefill_and_swap_none(
    make_llm: Any, monkeypatch: pytest.MonkeyPatch, async_scheduling: bool
) -> None:
    prompts = random_prompts(6, 400, lo=20, hi=30)
    common = dict(dtype="float32", async_scheduling=async_scheduling, debug_check_every=1)
    common.update(enable_prefix_caching=False)
    roomy = make_llm(chunk_size=CHUNK, **common)
    lives = Lives(monkeypatch)
    ref = greedy_tokens(roomy, prompts, NEW)
    s = roomy.engine.stats()
    assert s.preemptions == 0 and s.recomputed_prompt_tokens == 0
    assert s.prefill_tokens == sum(map(len, prompts))  # each prompt once
    assert s.computed_tokens == sum(lives.final.values())

    lives = Lives(monkeypatch)
    recompute = make_llm(**TIGHT, **common, preemption_mode="recompute")
    assert greedy_tokens(recompute, prompts, NEW) == ref
    r = recompute.engine.stats()
    assert r.preemptions == sum(map(len, lives.preempted.values())) > 0
    assert r.recomputed_prompt_tokens == lives.recomputed() > 0
    # The re-prefills cover the prompts again and the tokens generated before.
    assert r.prefill_tokens >= sum(map(len, prompts)) + r.recomputed_prompt_tokens
    assert r.computed_tokens == sum(lives.final.values()) + r.recomputed_prompt_tokens

    swap = make_llm(**TIGHT, **common, swap_space_bytes=64 * CHUNK, preemption_mode="swap")
    assert greedy_tokens(swap, prompts, NEW) == ref
    w = swap.engine.stats()
    assert w.swap_preemptions == w.preemptions > 0 and w.swap_dropped == 0
    assert w.recomputed_prompt_tokens == 0
    assert w.prefill_tokens == sum(map(len, prompts))


def test_recomputed_tokens_in_metrics(make_llm: Any) -> None:
    from vtensor.server.metrics import ServerMetrics

    llm = make_llm(**TIGHT, dtype="float32", preemption_mode="recompute")
    greedy_tokens(llm, random_prompts(6, 400, lo=20, hi=30), NEW)
    s = llm.engine.stats()
    assert s.recomputed_prompt_tokens > 0
    text = ServerMetrics().render(s, time.monotonic())
    assert f"vtensor_recomputed_prompt_tokens_total {s.recomputed_prompt_tokens}" in text
    assert f"vtensor_prefill_tokens_total {s.prefill_tokens}" in text
    assert f"vtensor_computed_tokens_total {s.computed_tokens}" in text
