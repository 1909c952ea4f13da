"""The tensor-parallel benchmarks' code on the CPU (gloo): a smoke test of what the
lead runs on two GPUs, and the per-GPU floor's byte count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
