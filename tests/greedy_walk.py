"""Two engines' greedy outputs compared as far as floating point allows.

Two correct engines that batch the same requests differently (a prefix cache, a
preemption, a swap, tensor parallelism, another attention kernel) do not compute
bit-identical logits: a GEMM over a different number of rows, or an all-reduce, sums
in another order. On the H100 an fp32 random network moved log-probs by up to 6e-3
nats between a roomy and a preempting engine (8 layers, width 512, init 0.15; 1e-5 at
the width-scaled init of ``tests/checkpoints.py``), so somewhere in a thousand greedy
tokens a near-tie can flip, and an exact token match fails once in a few runs
without any bug. So the walk below:

- compares each sequence step by step while both engines pick the same token: its
  log-probs must agree within ``tol``;
- where the tokens differ, requires a near-tie flipped by rounding: each token in the
  other's listed log-probs and within ``tol`` of it in both engines. The contexts
  differ from there, so the walk of that sequence stops;
- requires most of the tokens to have been compared, so that a divergence cannot
  hide a broken engine.

A real bug (a wrong chunk, a stale copy, a key dropped) moves log-probs by 0.1 nats
or more at the step it bites, far above the fp32 ``tol``. The outputs need
``SamplingParams(logprobs=k)`` with ``k >= 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FP32_TOL = 1e-3  # nats: ~100x the fp32 drift measured at the width-scaled init


@dataclass(frozen=True)
class Walk:
    """Steps compared per sequence (up to a near-tie flip), and the log-prob drifts."""

    steps: list[int]
    diverged: list[bool]
    mean_delta: float
    max_delta: float


def walk(xs: Sequence[Any], ys: Sequence[Any], tol: float, what: str) -> Walk:
    """Walk completion outputs ``xs`` against ``ys`` pairwise (module docstring)."""
    steps, diverged, deltas = [], [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert len(x.token_ids) == len(y.token_ids), f"{what}: sequence {i} lengths differ"
        n, split = 0, False
        for tx, ty, lx, ly in zip(x.token_ids, y.token_ids, x.logprobs, y.logprobs):
            where = f"{what}: sequence {i}, step {n}"
            if tx != ty:
                assert tx in ly and ty in lx, f"{where}: {tx} vs {ty} is no near-tie"
                assert abs(lx[tx] - lx[ty]) < tol and abs(ly[tx] - ly[ty]) < tol, where
                split = True
                break
            deltas.append(abs(lx[tx] - ly[ty]))
            assert deltas[-1] < tol, f"{where}: log-prob {lx[tx]} vs {ly[ty]}"
            n += 1
        steps.append(n)
        diverged.append(split)
    mean = sum(deltas) / max(1, len(deltas))
    print(f"{what}: steps compared {steps}, mean |delta| {mean:.2e}, max {max(deltas):.2e}")
    return Walk(steps, diverged, mean, max(deltas, default=0.0))


def assert_greedy_close(
    a: Sequence[Any], b: Sequence[Any], what: str, tol: float = FP32_TOL, share: float = 0.5
) -> Walk:
    """``a`` and ``b`` are lists of ``RequestOutput``; each's first completion is walked.
    At least ``share`` of all tokens must have been compared."""
    w = walk([o.outputs[0] for o in a], [o.outputs[0] for o in b], tol, what)
    total = sum(len(o.outputs[0].token_ids) for o in a)
    assert sum(w.steps) >= share * total, f"{what}: only {sum(w.steps)} of {total} compared"
    return w
