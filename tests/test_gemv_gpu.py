"""The small-batch GEMV on the GPU: the real Llama-3-8B shapes at M = 1..8, every
configuration the benchmark's sweep tries, CUDA-graph capture and replay (split-K
scratch included), offsets past 2^31 elements, and the model's dispatch.

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtensor.bench.gemv_cases import model_shapes, sweep_grid
from vtensor.kernels.gemv import _num_sms, gemv, should_use_gemv
from vtensor.kernels.gemv_config import GemvConfig
from vtensor.kernels.reference import linear_error_bound, linear_ref
from vtensor.models import linear as linear_mod

from .test_gemv import assert_within_bound

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LLAMA3_8B = [(s.n, s.k) for s in model_shapes("8b")]  # qkv, o, gate_up, down, lm_head


def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


@pytest.mark.parametrize("n,k", LLAMA3_8B)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama3_8b_shapes(n: int, k: int, dtype: torch.dtype) -> None:
    w = rand(n, k, dtype=dtype)
    for m in range(1, 9):
        x = rand(m, k, dtype=dtype)
        assert_within_bound(gemv(x, w), x, w)


@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_every_sweep_config_at_o_and_down(m: int) -> None:
    """Each configuration the sweep may pick compiles and is right (o: split-K)."""
    for n, k in [(4096, 4096), (4096, 14336)]:
        w, x = rand(n, k), rand(m, k)
        for cfg in sweep_grid(m, n, k, _num_sms(x.device)):
            y = gemv(x, w, cfg)
            err = (y.float() - linear_ref(x, w)).abs() - linear_error_bound(x, w, x.dtype)
            assert float(err.max()) <= 0, cfg.label()


def test_tails_on_the_gpu() -> None:
    for n, k in [(37, 100), (4099, 4104), (130, 4095)]:
        w = rand(n, k)
        for m in (1, 3, 8):
            x = rand(m, k)
            assert_within_bound(gemv(x, w), x, w)


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_cuda_graph_replay_reads_new_inputs(m: int) -> None:
    """Captured after a warm-up (as the engine does), replays see new x and W values at
    the same addresses: the table's configs, and a split-K one (its scratch reused)."""
    w = [rand(4096, 4096), rand(6144, 4096), rand(4096, 4096)]
    cfgs = [None, None, GemvConfig(64, 128, 4, "dot", split_k=4, num_stages=4)]
    x = rand(m, 4096)

    def calls() -> list[torch.Tensor]:
        return [gemv(x, wi, cfg) for wi, cfg in zip(w, cfgs)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = calls()
    for _ in range(3):
        x.copy_(rand(m, 4096))
        for wi in w:
            wi.copy_(rand(*wi.shape))
        graph.replay()
        torch.cuda.synchronize()
        for wi, y in zip(w, outs):
            assert_within_bound(y, x, wi)


def test_offsets_past_2_31_elements() -> None:
    """W with N·K > 2^31 (4.3 GB of bf16): the last rows are read at 64-bit offsets."""
    n, k = (1 << 31) // 4096 + 4096, 4096
    w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    w[-8192:].normal_()
    w[:-8192].zero_()
    for m in (1, 4):
        x = rand(m, k)
        y = gemv(x, w)
        assert_within_bound(y[:, -8192:].contiguous(), x, w[-8192:])
        assert not y[:, :-8192].any()
    del w
    torch.cuda.empty_cache()


def test_dispatch_and_switch() -> None:
    w, b = rand(512, 256), rand(512)
    for m, expect in [(1, True), (2, True), (3, False), (9, False)]:  # DISPATCH_MAX_M
        assert should_use_gemv(rand(m, 256), w) is expect
    assert not should_use_gemv(rand(2, 256), w, b)
    assert not should_use_gemv(rand(2, 256, dtype=torch.float32), w.float())
    assert not should_use_gemv(rand(2, 256), rand(256, 512).T)
    x = rand(4, 256)
    assert_within_bound(linear_mod.linear(x, w), x, w)
    assert torch.equal(linear_mod.linear(x, w, b), F.linear(x, w, b))
    was = linear_mod.gemv_enabled()
    try:
        linear_mod.set_gemv_enabled(False)
        assert torch.equal(linear_mod.linear(x, w), F.linear(x, w))
    finally:
        linear_mod.set_gemv_enabled(was)
