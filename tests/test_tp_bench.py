"""The tensor-parallel benchmarks' code on the CPU (gloo): a smoke test of what the
lead runs on two GPUs, and the per-GPU floor's byte count."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vtensor.bench.allreduce_report import load as allreduce_load
from vtensor.bench.allreduce_report import render as allreduce_render
from vtensor.bench.collectives import bus_seconds, step_collectives
from vtensor.bench.tp_report import load, render
from vtensor.cli import main as cli_main


def test_offline_bench_counts_one_gpus_bytes_and_the_report_reads_it(tmp_path: Path) -> None:
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"offline_8b_tp{tp}.json"  # the names tp_report reads
        argv = ["bench", "offline", "--num-prompts", "3", "--input-len", "16", "--output-len",
                "4", "--decode-batches", "2", "--decode-ctx", "16", "--decode-steps", "3",
                "--device", "cpu", "--no-hf-peer", "-tp", str(tp), "--json", str(out)]  # fmt: skip
        assert cli_main(argv) == 0
        runs[tp] = json.loads(out.read_text())
    one, two = runs[1]["decode"][0], runs[2]["decode"][0]
    assert (one["tp"], two["tp"], two["running_every_step"]) == (1, 2, 2)
    # Each GPU reads its half of every split weight, all of the (tiny) replicated norms.
    assert 0.5 < two["weight_bytes"] / one["weight_bytes"] < 0.52
    assert two["kv_bytes_read"] == pytest.approx(one["kv_bytes_read"] / 2)  # 2 KV heads split
    assert runs[2]["throughput"][0]["num_prompts"] == 3
    report = render(load(tmp_path))  # no collectives, no 70B run: reported missing
    assert "missing (stage failed or timed out): collectives, offline_70b_tp2" in report
    speedup = one["step_ms"] / two["step_ms"]
    row = next(line for line in report.splitlines() if line.lstrip().startswith("2 "))
    assert f"{speedup:.2f}" in row.split()  # batch 2: TP1 ms, TP2 ms, speed-up, ...
    assert "not measured" in report


def test_collectives_bench_runs_a_steps_collectives(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "col.json"
    argv = ["bench", "collectives", "--device", "cpu", "--shapes", "llama3-8b", "--batches",
            "1,2", "--sizes-mib", "1", "--iters", "2", "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["tp"] == 2 and [s["batch"] for s in data["steps"]] == [1, 2]
    step = data["steps"][0]
    assert step["all_reduces"] == 65 and step["all_reduce_bytes"] == 4096 * 2
    assert "one decode step's collectives" in capsys.readouterr().out


def test_a_steps_bytes_at_bus_bandwidth() -> None:
    s = step_collectives("llama3-70b", 64, 2)
    assert s["all_reduces"] == 161 and s["all_reduce_bytes"] == 64 * 8192 * 2
    # 161 all-reduces move half their bytes each way; the gather one rank's part.
    moved = 161 * 64 * 8192 * 2 * 2 * 1 / 2 + 64 * 64128 * 2
    assert bus_seconds(s, 2, 1e9) == pytest.approx(moved / 1e9)


def test_collectives_bench_with_symm_mem_on_gloo_falls_back_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "collectives_symm.json"
    argv = ["bench", "collectives", "--device", "cpu", "--shapes", "llama3-8b", "--batches",
            "1", "--sizes-mib", "1", "--iters", "2", "--all-reduce", "symm-mem",
            "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert json.loads(out.read_text())["all_reduce"] == "nccl"  # what it really used


def _write(folder: Path, name: str, data: dict[str, Any]) -> None:
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_the_allreduce_report_sets_nccl_beside_symm_mem(tmp_path: Path) -> None:
    rng = random.Random()
    ms = {run: {b: rng.uniform(20, 30) for b in (1, 16, 64)} for run in ("nccl", "symm")}
    floor = {b: rng.uniform(16, 19) for b in (1, 16, 64)}
    for run in ("nccl", "symm"):
        _write(tmp_path, f"offline_70b_tp2_{run}", {"all_reduce": "symm-mem" if run == "symm"
               else "nccl", "decode": [{"batch": b, "step_ms": ms[run][b], "floor_ms": floor[b],
               "x_floor": ms[run][b] / floor[b]} for b in (1, 16, 64)]})  # fmt: skip
        _write(tmp_path, f"collectives_{run}", {"all_reduce": "nccl", "steps": [
            {"shape": "llama3-70b", "batch": 64, "all_reduce_bytes": 1 << 20, "step_ms": 4.6,
             "per_all_reduce_us": 28.4 if run == "nccl" else 9.2}]})  # fmt: skip
    report = allreduce_render(allreduce_load(tmp_path))
    assert "missing (stage failed or timed out): allreduce_candidates" in report
    assert "'collectives_symm': 'nccl'" in report  # asked for symm-mem, fell back: shown
    row = next(line.split() for line in report.splitlines() if line.startswith("   64 "))
    want = [
        64,
        floor[64],
        ms["nccl"][64],
        ms["nccl"][64] / floor[64],
        ms["symm"][64],
        ms["symm"][64] / floor[64],
        ms["nccl"][64] / ms["symm"][64],
    ]
    assert [float(v) for v in row] == pytest.approx(want, abs=0.006)
    verdict = {run: "MET" if ms[run][64] / floor[64] <= 1.3 else "NOT MET" for run in ms}
    assert (f"nccl: {verdict['nccl']} ({ms['nccl'][64] / floor[64]:.2f}x); symm-mem: "
            f"{verdict['symm']} ({ms['symm'][64] / floor[64]:.2f}x)") in report  # fmt: skip
    assert "28.40" in report and "9.20" in report
