"""``vtensor bench kernels`` pieces on the CPU: SGLang's split heuristic, the VMM arena
(host backend) with its mapping checks, the graph rotation, the candidates, the goal
marks, and the grid → tables plumbing with fake timers, a torch FA2 stand-in and a fake
SGLang (the timings themselves and the graph capture need a GPU:
test_bench_kernels_gpu.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vtensor.bench import kernel_timing, kernels
from vtensor.bench.kernel_arenas import DenseArena, HeadConfig, VmmArena
from vtensor.bench.kernel_candidates import (
    DEFAULT,
    GRID,
    MAX_GRID_WAVES,
    parse_candidate,
    parse_candidates,
)
from vtensor.bench.kernel_graph_report import add_graph_rates, goal_marks, graph_summary
from vtensor.bench.kernel_grid import KernelGrid, grid_from_args
from vtensor.bench.kernel_peers import SGLANG_MAX_KV_SPLITS, sglang_num_kv_splits
from vtensor.bench.kernel_report import print_tables, summaries
from vtensor.bench.kernel_timing import rel_err, replays_per_sample, rotation, wrong
from vtensor.cli import build_parser
from vtensor.cli import main as cli_main
from vtensor.kernels import decode_attention
from vtensor.kernels.decode_config import DecodeConfig
from vtensor.kernels.reference import decode_ref

TINY = HeadConfig("tiny (4/2)", q_heads=4, kv_heads=2, head_dim=16, layers=2)
H100_SMS = 132


def test_sglang_splits_match_its_heuristic_on_equal_lengths() -> None:
    # Values of SGLang 0.5.5's get_num_kv_splits_triton (run in the Triton interpreter
    # during development) for Llama-3-8B heads on an H100: the GPU-filling count falls
    # as the batch grows, and never exceeds the default max of 8.
    llama = [sglang_num_kv_splits([1024] * b, 32, 8, H100_SMS)[0] for b in (1, 8, 32, 128)]
    assert llama == [8, 8, 3, 1]
    long = [sglang_num_kv_splits([32768] * b, 32, 8, H100_SMS)[0] for b in (1, 8, 32, 128)]
    assert long == [8, 8, 5, 2]
    assert sglang_num_kv_splits([4096] * 64, 32, 32, H100_SMS) == [1] * 64  # MHA: many programs


def test_sglang_splits_even_out_uneven_lengths() -> None:
    # Longest 4000, shortest 1000: the longest is cut into 4 splits of 1000 tokens, so every
    # request gets ceil(len / 1000) splits; the GPU-filling count (1 at this batch) is lower.
    lens = [1000, 2500, 4000] * 100
    assert sglang_num_kv_splits(lens, 32, 8, H100_SMS)[:3] == [1, 3, 4]
    # Within 25% of each other: no evening out.
    assert set(sglang_num_kv_splits([1000, 1200] * 150, 32, 8, H100_SMS)) == {1}
    assert max(sglang_num_kv_splits([10, 100_000], 32, 8, H100_SMS)) == SGLANG_MAX_KV_SPLITS


def test_vmm_arena_maps_on_demand_and_decode_reads_it() -> None:
    chunk = 4096  # 8 tokens of TINY in fp32 (512 B each)
    arena = VmmArena(1 << 20, torch.device("cpu"), torch.float32, 64, host_chunk=chunk)
    try:
        with arena.point(TINY, 3, 20) as p:
            ev = p.evidence
            assert ev["arena"] == "vmm" and ev["chunks_mapped_before"] == 0
            assert ev["chunks_mapped"] == 1 + 3 * 3  # scratch + ceil(20 / 8) per request
            assert ev["slot_tokens"] == 64 and p.max_len == 64  # max_len as the engine's
            assert ev["reserved_bytes"] == 4 * 64 * 512 > ev["mapped_bytes"]
            assert p.starts.tolist() == [64, 128, 192]  # slot 0 is the scratch slot
            q = torch.randn(3, TINY.q_heads, TINY.head_dim)
            lens = torch.full((3,), 20, dtype=torch.int32)
            got = decode_attention(q, p.k, p.v, p.starts, lens, p.max_len)
            want = decode_ref(q, p.k, p.v, p.starts, lens, TINY.head_dim**-0.5)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        stats = arena.pool.stats()
        assert stats.in_use == 0 and stats.balanced  # the point's arena gave its chunks back
        with arena.point(TINY, 1000, 20) as p:
            assert p is None  # over the pool's budget: skipped, not mapped
    finally:
        arena.close()


def test_arena_points_fill_the_rotated_layers_alike() -> None:
    cfg = HeadConfig("tiny4 (4/2)", q_heads=4, kv_heads=2, head_dim=16, layers=4)
    dense = DenseArena(1 << 20, torch.device("cpu"), torch.float32)
    vmm = VmmArena(1 << 20, torch.device("cpu"), torch.float32, 64, host_chunk=4096)
    for arena in (dense, vmm):
        try:
            with arena.point(cfg, 2, 20, layers=3) as p:
                assert len(p.layers) == 3 and p.layers[0] == (p.k, p.v)
                ptrs = {t.data_ptr() for kv in p.layers for t in kv}
                assert len(ptrs) == 6  # every layer's K and V are distinct views
                for k, v in p.layers:
                    for t in (k, v):
                        rows = torch.cat([t[s : s + 20] for s in p.starts.tolist()])
                        assert rows.isfinite().all() and 0.5 < rows.std() < 1.5  # normal_
                assert not torch.equal(p.layers[0][0][p.starts[0]], p.layers[2][0][p.starts[0]])
            with pytest.raises(ValueError, match="1 to 4 layers"), arena.point(cfg, 2, 20, 5):
                pass
        finally:
            arena.close()


def test_rotation_reads_256_mib_per_replay_within_the_layers() -> None:
    mib = 1 << 20
    assert rotation(4 * mib, 32) == 32  # 128 MiB: capped by the layers, as a decode step
    assert rotation(64 * mib, 32) == 4
    assert rotation(100 * mib, 32) == 3  # rounded up: at least 256 MiB
    assert rotation(2 << 30, 32) == 1
    assert rotation(1, 1) == 1
    with pytest.raises(ValueError):
        rotation(0, 32)
    assert replays_per_sample(0.05) == 200 and replays_per_sample(100.0) == 2
    assert replays_per_sample(1.0, sample_ms=10.0) == 10


def test_decode_candidates_parse_and_the_grid_is_small() -> None:
    assert parse_candidates("") == [] and parse_candidates("  ") == []
    grid = parse_candidates("all")
    assert grid == list(GRID) and grid[0] == DEFAULT and DEFAULT.config == DecodeConfig()
    configs = [c for c in grid if c.waves == DEFAULT.waves]
    assert len(configs) <= 10 and len({c.config for c in configs}) == len(configs)
    assert {c.waves for c in grid} == {1, 2, 4, 8} and MAX_GRID_WAVES == 8
    for c in grid:  # names round-trip; every config is valid
        assert parse_candidate(c.name) == c
    named = parse_candidates("n32-w8-s4-m256+waves2, n64-w4-s3-m64")
    assert [c.name for c in named] == [DEFAULT.name, "n32-w8-s4-m256+waves2"]
    assert named[1].config == DecodeConfig(32, 8, 4, 256) and named[1].waves == 2
    # The waves change the split count as choose_num_splits's target.
    assert named[1].num_splits(1, 32, 32768, 132) == 9 == -(-2 * 132 // 32)
    assert DEFAULT.num_splits(1, 32, 32768, 132) == 17 == -(-4 * 132 // 32)
    for bad in ("n64-w4", "n48-w4-s3-m64", "n64-w4-s3-m64+waves0", "all,n64"):
        with pytest.raises(ValueError):
            parse_candidates(bad)


def test_time_peer_checks_before_it_times_and_records_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(kernel_timing, "eager_ms", lambda fn: (seen.append("eager"), 2.0)[1])
    monkeypatch.setattr(kernel_timing, "graph_ms", lambda fns: (seen.append("graph"), 1.0)[1])
    ref = torch.randn(3, 4, 8)
    res: dict[str, Any] = {}
    kernel_timing.time_peer(res, "good", [lambda: ref + 1e-4 * torch.randn(3, 4, 8)], ref)
    assert res["good_err"] < 1e-3 and (res["good_ms"], res["good_graph_ms"]) == (2.0, 1.0)
    assert seen == ["eager", "graph"]
    kernel_timing.time_peer(res, "bad", [lambda: torch.zeros(3, 4, 8)], ref, eager=False)
    assert res["bad_err"] == pytest.approx(1.0) and wrong(res["bad_err"])
    assert "bad_ms" not in res and res["bad_graph_ms"] == 1.0
    kernel_timing.time_peer(res, "nan", [lambda: torch.full((3, 4, 8), float("nan"))], ref)
    assert res["nan_err"] == float("inf") and wrong(res["nan_err"])
    assert rel_err(None, ref) == float("inf") and rel_err(ref[:1], ref) == float("inf")

    def boom() -> None:
        raise RuntimeError("no kernel image\nsecond line")

    kernel_timing.time_peer(res, "boom", [boom], ref)
    assert res["boom_error"] == "RuntimeError: no kernel image"
    assert not any(k.startswith("boom_") and k.endswith("ms") for k in res)


def _row(gbs: float, sgl: float, sgl_own: float, nbytes: int, err: float = 1e-3) -> dict:
    ms = {name: nbytes / (g * 1e6) for name, g in (("v", gbs), ("s", sgl), ("o", sgl_own))}
    return {
        "config": "c", "arena": "dense", "batch": 1, "ctx": 1024, "bytes": nbytes,
        "vtensor_graph_ms": ms["v"], "sglang_graph_ms": ms["s"], "sglang_own_graph_ms": ms["o"],
        "vtensor_err": err, "fa2_err": 1e-3, "sglang_err": 2e-3,
    }  # fmt: skip


def test_graph_goals_marks_and_summary() -> None:
    read, mib = 3000.0, 1 << 20
    rows = [
        _row(2400, 1800, 1500, 64 * mib),  # 80% of the ceiling, 1.33x the faster SGLang
        _row(1000, 900, 500, 32 * mib),  # below 64 MiB: the ceiling goal does not apply
        _row(2900, 2600, 2000, 1 << 30),  # 1.2 x 2600 > 3000: no kernel can meet it
        _row(2950, 1000, 1000, 1 << 30, err=0.5),  # fast and wrong: never a met goal
        _row(1300, 1000, 2900, 32 * mib) | {"sglang_own_err": 0.3},  # a wrong SGLang: no peer
    ]
    for r in rows:
        add_graph_rates(r, read)
    assert rows[0]["vtensor_graph_gbs"] == pytest.approx(2400)
    assert rows[0]["graph_speedup_vs_sglang_best"] == pytest.approx(2400 / 1800)
    assert goal_marks(rows[0]) == ["ceil ok", "sgl ok"]
    assert goal_marks(rows[1]) == ["sgl MISS"]
    assert goal_marks(rows[2]) == ["ceil ok", "sgl MISS", "1.2x > ceiling"]
    assert goal_marks(rows[3]) == ["WRONG", "ceil ok", "sgl ok"]
    assert rows[4]["graph_speedup_vs_sglang_best"] == pytest.approx(1.3)  # vs the right one
    assert rows[4]["sglang_goal_possible"] and goal_marks(rows[4]) == ["sgl ok"]
    s = graph_summary(rows)
    assert s["graph_points_ge_64MiB"] == 3 and s["graph_ceiling_goal_met"] == "2 of 3"
    assert s["graph_sglang_goal_met"] == "2 of 5" and s["graph_sglang_goal_impossible"] == 1
    assert s["graph_goals_met"] is False and s["max_rel_err_vs_fa2"] == 0.5
    assert s["wrong"] == ["vtensor b=1 ctx=1024 c", "sglang_own b=1 ctx=1024 c"]
    assert s["graph_min_pct_of_read_ceiling_ge_64MiB"] == pytest.approx(80.0)
    assert graph_summary(rows[:1])["graph_goals_met"] is True
    no_sgl = {k: v for k, v in rows[0].items() if not k.startswith(("sglang", "graph_speed"))}
    assert graph_summary([no_sgl])["graph_goals_met"] is None  # SGLang not run: not judged


def _fake_sglang(calls: list[tuple[str, Any]]) -> SimpleNamespace:
    """SGLang's decode as the fp32 reference over its pool; wrong (zeros) with its own
    heuristic's split buffers, so the run must flag that column WRONG."""

    def decode(q, k, v, o, indptr, indices, logits, lse, nsplit, max_splits, scale) -> None:  # type: ignore[no-untyped-def]
        calls.append(("decode", (nsplit.tolist(), max_splits, logits.shape[2], k.data_ptr())))
        assert torch.equal(indices, torch.arange(indptr[-1]))
        lens = (indptr[1:] - indptr[:-1]).int()
        o.copy_(decode_ref(q, k, v, indptr[:-1], lens, scale))
        if max_splits == SGLANG_MAX_KV_SPLITS:
            o.zero_()

    def extend(*args: Any) -> None:
        calls.append(("extend", args[4].shape[0]))

    return SimpleNamespace(decode_attention_fwd=decode, extend_attention_fwd=extend)


def _fa2_stand_in(q, k, v, starts, lens, max_len):  # type: ignore[no-untyped-def]
    return decode_ref(q, k, v, starts, lens, q.shape[-1] ** -0.5).to(q.dtype)


CALL_BYTES = 2 * 2 * 24 * 2 * 16 * 4  # K and V of batch 2, ctx 24, 2 KV heads × 16, fp32


def _run_grid(monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[list[Any]], list[Any]]:
    """Both arenas, one point (batch 2, ctx 24, R = 3 of 4 layers), a candidate, SGLang
    on the dense pass; fake timers. Returns (results, each graph's calls, SGLang's calls)."""
    times = iter(range(1, 10_000))
    monkeypatch.setattr(kernels, "_bench", lambda fn: (fn(), float(next(times)))[1])
    monkeypatch.setattr(kernel_timing, "eager_ms", lambda fn: (fn(), float(next(times)))[1])
    graphs: list[list[Any]] = []  # each graph timing's calls (capture needs CUDA), each run

    def graph_ms(fns: list[Any]) -> float:
        graphs.append(fns)
        for f in fns:
            f()
        return 0.5

    monkeypatch.setattr(kernel_timing, "graph_ms", graph_ms)
    monkeypatch.setattr(kernels, "fa2_decode", _fa2_stand_in)  # FA2 needs CUDA
    monkeypatch.setattr(kernels, "fa2_extend", lambda *a: None)
    monkeypatch.setattr(kernel_timing, "ROTATE_BYTES", 3 * CALL_BYTES)  # R = 3 of 4 layers
    cfg = HeadConfig("tiny4 (4/2)", q_heads=4, kv_heads=2, head_dim=16, layers=4)
    calls: list[tuple[str, Any]] = []
    sgl = (_fake_sglang(calls), _fake_sglang(calls))
    cands = tuple(parse_candidates("n32-w4-s2-m64+waves8"))
    grid = KernelGrid((cfg,), (2,), (24,), cands, True, 2, (0, 8), (8,))
    res: dict[str, Any] = {"decode": [], "extend": [], "read_gbs": 1.0, "copy_gbs": 1.0}
    res.update(sglang=True, max_model_len=64)
    kernels.run_arena(DenseArena(1 << 20, torch.device("cpu"), torch.float32), sgl, grid, res)
    assert len(graphs) == 6  # fa2, vtensor, 2 candidates, sglang, sglang own
    vmm = VmmArena(1 << 20, torch.device("cpu"), torch.float32, 64, host_chunk=4096)
    kernels.run_arena(vmm, None, grid, res)
    assert len(graphs) == 10  # no SGLang on the vmm pass
    summaries(res)
    print_tables(res)
    return res, graphs, calls


def test_grid_runs_on_both_arenas_with_graph_rotation_and_checks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    res, graphs, calls = _run_grid(monkeypatch)
    dense, vmm_row = res["decode"]
    assert dense["max_len"] == 24 and vmm_row["max_len"] == 64
    assert vmm_row["chunks_mapped"] == 1 + 2 * 6  # 4 tokens of 4 layers per chunk
    assert dense["rotate"] == vmm_row["rotate"] == 3 and dense["bytes"] == CALL_BYTES
    for fns in graphs:  # each graph: one call per rotated layer, each on its own K/V
        # (ours and FA2: partial(kernel, q, k, v, ...); SGLang: partial(call, k_pool, v_pool))
        keys = [f.args[0] if len(f.args) == 2 else f.args[1] for f in fns]
        assert len(fns) == 3 and len({k.data_ptr() for k in keys}) == 3
    # Ours, FA2 and the candidates are checked (and right); SGLang's own is caught wrong.
    for r in (dense, vmm_row):
        assert r["vtensor_err"] < 1e-4 and r["fa2_err"] < 1e-6
        assert set(r["candidates"]) == {DEFAULT.name, "n32-w4-s2-m64+waves8"}
        assert all(c["err"] < 1e-4 and c["graph_ms"] == 0.5 for c in r["candidates"].values())
        assert r["candidates"]["n32-w4-s2-m64+waves8"]["splits"] == 1  # min_split 64 ≥ ctx
    assert dense["sglang_err"] < 1e-4 and wrong(dense["sglang_own_err"])
    assert dense["sglang_own_splits"] == max(sglang_num_kv_splits([24] * 2, 4, 2, 4))
    assert dense["sglang_pool_bytes"] == 3 * CALL_BYTES  # one pool per rotated layer
    decodes = [c[1] for c in calls if c[0] == "decode"]
    assert len(decodes) == 2 * (1 + 1 + 3)  # each: checked, eager, 3 in the graph
    assert decodes[-1][1] == decodes[-1][2] == SGLANG_MAX_KV_SPLITS
    # The VMM rows borrow the dense pass's SGLang figures (SGLang reads its own pool).
    assert vmm_row["sglang_ms"] == dense["sglang_ms"] and vmm_row["sglang_from"] == "dense pass"
    assert vmm_row["sglang_graph_ms"] == dense["sglang_graph_ms"] == 0.5
    assert vmm_row["graph_speedup_vs_sglang_best"] == 1.0  # all graph timings faked at 0.5
    assert set(res["decode_summary"]) == {"dense", "vmm"}
    assert "sglang_own b=2 ctx=24 tiny4 (4/2)" in res["decode_summary"]["dense"]["wrong"]
    assert set(res["elapsed_s"]) == {"dense", "vmm"} and len(res["extend"]) == 4
    out = capsys.readouterr().out
    assert "CUDA-graph replay" in out and "sglang vt splits" in out and "Decode, eager" in out
    assert "WRONG sglang_own" in out and "sglang_own WRONG" in out
    assert "Decode candidates [dense] tiny4 (4/2)" in out and "geomean vs c0" in out
    assert "graph_sglang_goal_met" in out  # the goal summary, per arena


def test_cli_grid_options(capsys: pytest.CaptureFixture[str]) -> None:
    def grid(*argv: str) -> KernelGrid:
        return grid_from_args(build_parser().parse_args(["bench", "kernels", *argv]))

    full = grid()
    assert [h.kv_heads for h in full.heads] == [8, 32] and full.batches == (1, 8, 32, 128)
    assert full.ctxs == (1024, 4096, 16384, 32768) and full.extend and not full.candidates
    quick = grid("--quick", "--decode-configs", "all")
    assert len(quick.heads) == 1 and not quick.extend and len(quick.candidates) == len(GRID)
    assert grid("--quick", "--batches", "4").batches == (4,)
    assert grid("--head-configs", "mha", "--skip-extend").heads[0].kv_heads == 32
    assert cli_main(["bench", "kernels", "--decode-configs", "n48-w4-s3-m64"]) == 2
    assert "block_n must be a power of two" in capsys.readouterr().err
