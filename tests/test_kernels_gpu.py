"""Kernels at real shapes on the GPU: fresh random inputs, NaN-poisoned outputs,
relative error against fp32 references, and the FA2 adapter on the same arena."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vtensor.kernels import (
    DecodeWorkspace,
    decode_attention,
    extend_attention,
    fa2_decode,
    fa2_extend,
)
from vtensor.kernels.reference import decode_ref, extend_ref

from .kernel_cases import TOLERANCE, ints, make_case, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(32, 8, 128), (32, 32, 128), (16, 2, 64), (16, 16, 256), (8, 1, 128)]
DTYPES = [torch.bfloat16, torch.float16]


def _poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("q_heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_real_shapes(q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    lengths = torch.randint(1, 4096, (8,)).tolist()
    lengths[0], lengths[1] = 1, 4096
    case = make_case(8, 4096, q_heads, kv_heads, dim, dtype, "cuda", layers=4, layer=2)
    q = torch.randn(8, q_heads, dim, device="cuda").to(dtype)
    lens = ints(lengths, "cuda")
    ref = decode_ref(q, case.k, case.v, case.row_starts(), lens, dim**-0.5)
    ws = DecodeWorkspace.for_batch(8, q_heads, dim, "cuda")
    for splits in (None, 1, 7):
        for max_len in (4096, 131072):  # as the arguments, and as a decode graph's bound
            out = decode_attention(
                q, case.k, case.v, case.row_starts(), lens, max_len, num_splits=splits,
                workspace=ws, out=_poisoned_like(q),
            )  # fmt: skip
            assert rel_err(out, ref) < TOLERANCE[dtype], (splits, max_len)
    fa2 = fa2_decode(q, case.k, case.v, case.row_starts(), lens, 4096)
    assert rel_err(fa2, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("q_heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_real_shapes(q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    prefixes = [0, 1000, 37, 2048]
    news = [513, 1, 700, 128]
    case = make_case(4, 4096, q_heads, kv_heads, dim, dtype, "cuda", layers=4, layer=3)
    indptr = ints([0, *torch.tensor(news).cumsum(0).tolist()], "cuda")
    q = torch.randn(sum(news), q_heads, dim, device="cuda").to(dtype)
    args = (q, case.k, case.v, indptr, case.row_starts(), ints(prefixes, "cuda"))
    ref = extend_ref(*args, dim**-0.5)
    out = extend_attention(*args, max(news), out=_poisoned_like(q))
    assert rel_err(out, ref) < TOLERANCE[dtype]
    fa2 = fa2_extend(*args, max(news), max(p + n for p, n in zip(prefixes, news)))
    assert rel_err(fa2, ref) < TOLERANCE[dtype]


def test_outputs_fully_written() -> None:
    """Poison the arena's unused rows with NaN: kernels must never read past a length."""
    case = make_case(4, 1024, 32, 8, 128, torch.bfloat16, "cuda")
    lengths = [5, 1024, 300, 1]
    for i, s in enumerate(case.slots):
        row = case.layout.row_start(s)
        case.k[row + lengths[i] : row + 1024] = float("nan")
        case.v[row + lengths[i] : row + 1024] = float("nan")
    q = torch.randn(4, 32, 128, device="cuda").to(torch.bfloat16)
    out = decode_attention(q, case.k, case.v, case.row_starts(), ints(lengths, "cuda"), 1024)
    assert not torch.isnan(out).any()
    news = [5, 1, 64, 1]
    indptr = ints([0, *torch.tensor(news).cumsum(0).tolist()], "cuda")
    prefixes = ints([0, 1023, 236, 0], "cuda")
    qe = torch.randn(sum(news), 32, 128, device="cuda").to(torch.bfloat16)
    out = extend_attention(qe, case.k, case.v, indptr, case.row_starts(), prefixes, 64)
    assert not torch.isnan(out).any()


def _capture(step: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int]:
    """A graph of ``step``, and how many tensors its capture made with ``torch.empty``
    (how the decode wrapper makes scratch without a workspace)."""
    step()  # compile outside the capture
    torch.cuda.synchronize()
    made = 0
    empty = torch.empty

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal made
        made += 1
        return empty(*args, **kwargs)

    graph = torch.cuda.CUDAGraph()
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", counting)
        with torch.cuda.graph(graph):
            step()
    return graph, made


def test_decode_graph_replay_with_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode captured in a CUDA graph with a workspace, as the engine's decode graphs run
    it (max_len = a long bound): replays with new lengths and queries are right, and the
    capture makes no split-K scratch (without a workspace it makes two buffers)."""
    batch, q_heads, kv_heads, dim = 4, 32, 8, 128
    case = make_case(batch, 2048, q_heads, kv_heads, dim, torch.bfloat16, "cuda")
    ws = DecodeWorkspace.for_batch(batch, q_heads, dim, "cuda")
    q = torch.randn(batch, q_heads, dim, device="cuda").to(torch.bfloat16)
    lens = ints([1, 1, 1, 1], "cuda")
    starts, out = case.row_starts(), torch.empty_like(q)

    def step(workspace: DecodeWorkspace | None) -> Callable[[], object]:
        return lambda: decode_attention(
            q, case.k, case.v, starts, lens, 32768, workspace=workspace, out=out
        )

    graph, made = _capture(step(ws), monkeypatch)
    _, made_fresh = _capture(step(None), monkeypatch)
    assert (made, made_fresh) == (0, 2)
    for _ in range(3):
        lengths = [random.randint(1, 2048) for _ in range(batch)]
        lens.copy_(ints(lengths, "cuda"))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = decode_ref(q, case.k, case.v, starts, lens, dim**-0.5)
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16], lengths
