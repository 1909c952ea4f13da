"""benchmarks/unified_pool.py runs end to end on the CPU (a smoke run of the script that
the lead runs on the H100): both passes complete and its checks hold."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The script as a module on sys.path: its passes run in spawned processes, which
    import it by name (they inherit sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("unified_pool", None)
    return importlib.import_module("unified_pool")


def test_unified_pool_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "u.json"
    argv = ["--shape", "", "--device", "cpu", "--input-len", "70", "--output-len", "8",
            "--num-requests", "6", "--max-num-batched-tokens", "64", "--attention-backend",
            "torch", "--chunk-size", "4096", "--kv-cache-bytes", str(200 * 4096),
            "--small-static-tokens", "16", "--out", str(out)]  # fmt: skip
    assert load(monkeypatch).main(argv) == 0
    report = json.loads(out.read_text())
    unified, static, small = report["passes"]
    assert unified["completed"] == static["completed"] == small["completed"] == 6
    assert small["name"] == "static-16" and set(report["ratios"]) == {"static-64", "static-16"}
    assert report["table_source"] == "estimated"
    assert unified["max_running"] > static["max_running"]  # this budget: 6 against 3
    assert unified["inflates"] > 0 and static["inflates"] == 0
