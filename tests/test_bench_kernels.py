"""``vtensor bench kernels`` pieces on the CPU: SGLang's split heuristic, the VMM arena
(host backend) with its mapping checks, and the grid → tables plumbing with a fake
timer and a fake SGLang (the timings themselves need a GPU)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vtensor.bench import kernels
from vtensor.bench.kernel_arenas import DenseArena, HeadConfig, VmmArena
from vtensor.bench.kernel_peers import SGLANG_MAX_KV_SPLITS, sglang_num_kv_splits
from vtensor.bench.kernel_report import print_tables, summaries
from vtensor.kernels import decode_attention
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


def _fake_sglang(calls: list[tuple[str, Any]]) -> SimpleNamespace:
    def decode(q, k, v, o, indptr, indices, logits, lse, nsplit, max_splits, scale) -> None:  # type: ignore[no-untyped-def]
        calls.append(("decode", (nsplit.tolist(), max_splits, logits.shape[2])))

    def extend(*args: Any) -> None:
        calls.append(("extend", args[4].shape[0]))

    return SimpleNamespace(decode_attention_fwd=decode, extend_attention_fwd=extend)


def test_grid_runs_on_both_arenas_and_prints_both_sglang_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    times = iter(range(1, 10_000))
    monkeypatch.setattr(kernels, "_bench", lambda fn: (fn(), float(next(times)))[1])
    monkeypatch.setattr(kernels, "fa2_decode", lambda *a: None)  # FA2 needs CUDA
    monkeypatch.setattr(kernels, "fa2_extend", lambda *a: None)
    monkeypatch.setattr(kernels, "CONFIGS", [TINY])
    calls: list[tuple[str, Any]] = []
    sgl = (_fake_sglang(calls), _fake_sglang(calls))
    args = SimpleNamespace(batches=[2], ctxs=[24], extend_batch=2, prefixes=[0, 8], news=[8])
    res: dict[str, Any] = {"decode": [], "extend": [], "read_gbs": 1.0, "copy_gbs": 1.0}
    res.update(sglang=True, max_model_len=64)
    kernels.run_arena(DenseArena(1 << 20, torch.device("cpu"), torch.float32), sgl, args, res)
    vmm = VmmArena(1 << 20, torch.device("cpu"), torch.float32, 64, host_chunk=4096)
    kernels.run_arena(vmm, None, args, res)
    summaries(res)
    print_tables(res)
    dense, vmm_row = res["decode"]
    assert dense["max_len"] == 24 and vmm_row["max_len"] == 64 and vmm_row["chunks_mapped"] == 7
    assert dense["sglang_own_splits"] == max(sglang_num_kv_splits([24] * 2, 4, 2, 4))
    # SGLang's own heuristic runs with its max of 8 splits; vtensor's with its own count.
    own = [c[1] for c in calls if c[0] == "decode"][1]
    assert own[1] == own[2] == SGLANG_MAX_KV_SPLITS
    # The VMM rows borrow the dense pass's SGLang times (SGLang reads its own pool).
    assert vmm_row["sglang_ms"] == dense["sglang_ms"] and vmm_row["sglang_from"] == "dense pass"
    assert vmm_row["speedup_vs_sglang_own"] == dense["sglang_own_ms"] / vmm_row["vtensor_ms"]
    assert set(res["decode_summary"]) == {"dense", "vmm"}
    out = capsys.readouterr().out
    assert "sglang vt splits" in out and "sglang own splits" in out and "vmm" in out
