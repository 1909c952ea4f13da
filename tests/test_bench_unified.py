"""benchmarks/unified_pool.py runs end to end on the CPU (a smoke run of the script that
the lead runs on the H100): both passes complete and its checks hold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load() -> Any:
    spec = importlib.util.spec_from_file_location(
        "unified_pool", ROOT / "benchmarks/unified_pool.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unified_pool_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "u.json"
    argv = ["--shape", "", "--device", "cpu", "--input-len", "70", "--output-len", "8",
            "--num-requests", "6", "--max-num-batched-tokens", "64", "--attention-backend",
            "torch", "--chunk-size", "4096", "--kv-cache-bytes", str(200 * 4096),
            "--out", str(out)]  # fmt: skip
    assert load().main(argv) == 0
    report = json.loads(out.read_text())
    unified, static = report["passes"]
    assert unified["completed"] == static["completed"] == 6
    assert report["table_source"] == "estimated"
    assert unified["max_running"] > static["max_running"]  # this budget: 6 against 3
    assert unified["inflates"] > 0 and static["inflates"] == 0
