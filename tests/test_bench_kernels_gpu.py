"""``vtensor bench kernels`` decode timing on the GPU: CUDA-graph replay really runs the
captured calls, and one small point runs end to end on both arenas (ours, FA2, a
candidate and, where importable, SGLang) under graph replay, each checked against
FA2 with nothing failing. (The CPU tests cover the plumbing with fake timers.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vtensor.bench import kernels
from vtensor.bench.baselines import load_sglang
from vtensor.bench.kernel_arenas import DenseArena, HeadConfig, VmmArena
from vtensor.bench.kernel_candidates import parse_candidates
from vtensor.bench.kernel_grid import KernelGrid
from vtensor.bench.kernel_report import print_tables, summaries
from vtensor.bench.kernel_timing import MAX_ERR, SAMPLES, graph_ms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GiB = 1 << 30


def test_graph_timing_replays_the_captured_calls() -> None:
    x = torch.zeros(1, device="cuda", dtype=torch.int64)
    calls = [lambda: x.add_(1)] * 3
    ms = graph_ms(calls)
    runs = int(x.item())
    # Warm-up (3) and every replay (3 each) ran; the capture itself ran nothing: the first
    # upload replay, the probe replay, then SAMPLES samples of ≥ 2 replays.
    assert runs % 3 == 0 and runs >= 3 * (1 + 2 + 2 * SAMPLES)
    assert 0 < ms < 1.0


def test_one_point_end_to_end_under_graph_replay(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = HeadConfig("llama3-8b (32/8)", 32, 8)
    cands = tuple(parse_candidates("n32-w4-s4-m128"))
    grid = KernelGrid((cfg,), (2,), (1024,), cands, extend=False)
    sgl = load_sglang()
    res: dict[str, Any] = {"decode": [], "extend": [], "read_gbs": 3000.0, "copy_gbs": 3000.0}
    res.update(sglang=sgl is not None, max_model_len=4096)
    dev = torch.device("cuda")
    kernels.run_arena(DenseArena(GiB, dev, torch.bfloat16), sgl, grid, res)
    kernels.run_arena(VmmArena(GiB, dev, torch.bfloat16, 4096), None, grid, res)
    summaries(res)
    print_tables(res)
    dense, vmm = res["decode"]
    assert dense["max_len"] == 1024 and vmm["max_len"] == 4096 and vmm["arena"] == "vmm"
    for r in (dense, vmm):
        assert not [k for k in r if k.endswith("_error")], r
        assert r["rotate"] == 32  # 8 MiB per call: every layer, 256 MiB per replay
        for peer in ("vtensor", "fa2"):
            assert r[f"{peer}_graph_ms"] > 0 and r[f"{peer}_ms"] > 0
            # 256 MiB per replay cannot sit in L2: a real replay stays under any HBM's speed.
            assert 10 < r[f"{peer}_graph_gbs"] < 6000
        assert r["vtensor_err"] < MAX_ERR and r["fa2_err"] < MAX_ERR
        (cand,) = [c for name, c in r["candidates"].items() if name == cands[1].name]
        assert cand["err"] < MAX_ERR and cand["graph_ms"] > 0 and "error" not in cand
    if sgl is not None:
        for peer in ("sglang", "sglang_own"):
            assert dense[f"{peer}_err"] < MAX_ERR and dense[f"{peer}_graph_ms"] > 0
        assert dense["sglang_pool_bytes"] == 32 * dense["bytes"]
        assert vmm["sglang_graph_ms"] == dense["sglang_graph_ms"]  # borrowed
    assert res["decode_summary"]["dense"]["wrong"] == res["decode_summary"]["vmm"]["wrong"] == []
    assert "CUDA-graph replay" in capsys.readouterr().out
