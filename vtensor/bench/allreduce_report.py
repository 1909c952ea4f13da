"""NCCL against ``--all-reduce symm-mem``, side by side: ``python -m
vtensor.bench.allreduce_report DIR``.

Reads what ``benchmarks/tp_allreduce_h200x2.sh`` writes into ``DIR`` (a missing
file is reported as missing, the rest still shown):

* ``allreduce_candidates.json`` (``benchmarks/allreduce_candidates.py``): each
  candidate's time per all-reduce of a decode step's ``[batch, hidden]`` bf16,
  inside CUDA graphs, and whether its output was right;
* ``collectives_{nccl,symm}.json`` (``vtensor bench collectives``): one decode
  step's collectives replayed from a graph, per all-reduce;
* ``offline_70b_tp2_{nccl,symm}.json`` (``vtensor bench offline``): the 70B TP=2
  decode step against its floor (issue 16's goal: <= 1.3x at batch 64).

Each run's ``all_reduce`` field says what it really used: ``symm-mem`` asked for
but unavailable shows ``nccl`` (the engine logged why).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import format_table
from .tp_report import GOAL_70B_BATCH, GOAL_70B_X_FLOOR

RUNS = ("nccl", "symm")
Loaded = dict[str, dict[str, Any] | None]


def load(folder: Path) -> Loaded:
    names = ["allreduce_candidates"]
    names += [f"{kind}_{run}" for kind in ("collectives", "offline_70b_tp2") for run in RUNS]
    return {n: _read(folder / f"{n}.json") for n in names}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def candidates(r: Loaded) -> tuple[str, list[tuple[Any, ...]]]:
    data = r["allreduce_candidates"] or {}
    rows = [(c["candidate"], c["hidden"], c["batch"], c["kib"], c["us"],
             "ok" if c["ok"] else f"WRONG ({c['max_err']:.3g})")
            for c in data.get("rows", [])]  # fmt: skip
    head = (f"all-reduce candidates over {data.get('world')} GPUs in CUDA graphs "
            f"(torch {data.get('torch')}, symmetric memory "
            f"{'on' if data.get('symm') else 'UNAVAILABLE'}):")  # fmt: skip
    return head, rows


def collectives(r: Loaded) -> list[tuple[Any, ...]]:
    nccl, symm = (_steps(r[f"collectives_{run}"]) for run in RUNS)
    rows = []
    for key in sorted(set(nccl) | set(symm)):
        a, b = nccl.get(key), symm.get(key)
        rows.append((*key, _get(a, "all_reduce_bytes", 1 / 1024), _get(a, "per_all_reduce_us"),
                     _get(b, "per_all_reduce_us"), _get(a, "step_ms"), _get(b, "step_ms"),
                     _ratio(a, b, "step_ms")))  # fmt: skip
    return rows


def decode_70b(r: Loaded) -> tuple[list[tuple[Any, ...]], str]:
    nccl, symm = (_by_batch(r[f"offline_70b_tp2_{run}"]) for run in RUNS)
    rows, verdict = [], []
    for b in sorted(set(nccl) | set(symm)):
        a, s = nccl.get(b), symm.get(b)
        rows.append((b, _get(a, "floor_ms"), _get(a, "step_ms"), _get(a, "x_floor"),
                     _get(s, "step_ms"), _get(s, "x_floor"), _ratio(a, s, "step_ms")))  # fmt: skip
        if b == GOAL_70B_BATCH:
            for run, d in (("nccl", a), ("symm-mem", s)):
                if d and d.get("x_floor") is not None:
                    met = "MET" if d["x_floor"] <= GOAL_70B_X_FLOOR else "NOT MET"
                    verdict.append(f"{run}: {met} ({d['x_floor']:.2f}x)")
    goal = f"goal: 70B decode step <= {GOAL_70B_X_FLOOR}x floor at batch {GOAL_70B_BATCH}: "
    return rows, goal + ("; ".join(verdict) or "not measured")


def render(r: Loaded) -> str:
    missing = [n for n, v in r.items() if v is None]
    parts = [f"missing (stage failed or timed out): {', '.join(missing)}"] if missing else []
    used = {n: v.get("all_reduce") for n, v in r.items() if v and "all_reduce" in v}
    parts.append(f"all-reduce each run used: {used}")
    head, rows = candidates(r)
    parts += [head, _table(["candidate", "hidden", "batch", "KiB", "us each", "output"], rows)]
    parts.append("\none decode step's collectives, graph replay (us per all-reduce, step ms):")
    parts.append(_table(["shape", "batch", "KiB each", "nccl us", "symm us", "nccl ms",
                         "symm ms", "speed-up"], collectives(r)))  # fmt: skip
    rows, verdict = decode_70b(r)
    parts.append("\nLlama-3-70B decode step, TP=2 (ms; x floor: weights + KV one GPU reads):")
    parts.append(_table(["batch", "floor ms", "nccl ms", "nccl x", "symm ms", "symm x",
                         "speed-up"], rows))  # fmt: skip
    parts.append(verdict)
    return "\n".join(parts)


def _steps(run: dict[str, Any] | None) -> dict[tuple[str, int], dict[str, Any]]:
    return {(s["shape"], s["batch"]): s for s in (run or {}).get("steps", [])}


def _by_batch(run: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    return {d["batch"]: d for d in (run or {}).get("decode", [])}


def _get(d: dict[str, Any] | None, key: str, scale: float = 1.0) -> float | str:
    value = (d or {}).get(key)
    return "-" if value is None else float(value) * scale


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | str:
    x, y = (a or {}).get(key), (b or {}).get(key)
    return float(x) / float(y) if x and y else "-"


def _table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    return format_table(headers, rows) if rows else "  (no data)"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vtensor.bench.allreduce_report DIR", file=sys.stderr)
        return 2
    print(render(load(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
