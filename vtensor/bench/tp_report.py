"""Issue 16's tensor-parallel results in one report: ``python -m vtensor.bench.tp_report DIR``.

Reads what ``benchmarks/tp_h200x2.sh`` writes into ``DIR`` (a missing file is
reported as missing, the rest still shown):

* ``collectives.json`` (``vtensor bench collectives``): NCCL's bus bandwidth and
  each decode step's collectives, replayed from a CUDA graph;
* ``offline_8b_tp1.json``, ``offline_8b_tp2.json``, ``offline_70b_tp2.json``
  (``vtensor bench offline``): decode steps against the per-GPU floor, throughput.

The 70B goal: a TP=2 decode step at batch 64 within 1.3x its floor (the weights
and KV one GPU reads, over the read bandwidth measured in the same run).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import format_table

GOAL_70B_X_FLOOR = 1.3
GOAL_70B_BATCH = 64
FILES = ("collectives", "offline_8b_tp1", "offline_8b_tp2", "offline_70b_tp2")


def load(folder: Path) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for name in FILES:
        path = folder / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.is_file() else None
    return out


def collective_ms(col: dict[str, Any] | None, shape: str, batch: int) -> float | None:
    for s in (col or {}).get("steps", []):
        if s["shape"] == shape and s["batch"] == batch:
            return float(s["step_ms"])
    return None


def _by_batch(run: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    return {d["batch"]: d for d in (run or {}).get("decode", [])}


def decode_8b(r: dict[str, dict[str, Any] | None]) -> list[tuple[Any, ...]]:
    one, two = _by_batch(r["offline_8b_tp1"]), _by_batch(r["offline_8b_tp2"])
    rows = []
    for b in sorted(set(one) | set(two)):
        t1, t2 = one.get(b, {}).get("step_ms"), two.get(b, {}).get("step_ms")
        col = collective_ms(r["collectives"], "llama3-8b", b)
        rows.append((b, _d(t1), _d(t2), _d(t1 / t2 if t1 and t2 else None),
                     _d(two.get(b, {}).get("floor_ms")), _d(two.get(b, {}).get("x_floor")),
                     _d(col), _d(100 * col / t2 if col and t2 else None)))  # fmt: skip
    return rows


def throughput(r: dict[str, dict[str, Any] | None]) -> list[tuple[Any, ...]]:
    rows = []
    for name in FILES[1:]:
        for t in (r[name] or {}).get("throughput", []):
            lengths = f"{t['input_len']}/{t['output_len']}"
            rows.append((name, t["num_prompts"], lengths, t["output_tokens_per_s"],
                         t["total_tokens_per_s"], t["preemptions"]))  # fmt: skip
    return rows


def decode_70b(r: dict[str, dict[str, Any] | None]) -> tuple[list[tuple[Any, ...]], str]:
    rows, verdict = [], f"goal: 70B decode step <= {GOAL_70B_X_FLOOR}x floor at batch 64: "
    for b, d in sorted(_by_batch(r["offline_70b_tp2"]).items()):
        col = collective_ms(r["collectives"], "llama3-70b", b)
        gb = (d["weight_bytes"] + d["kv_bytes_read"]) / 1e9
        rows.append((b, d["ctx_at_window_start_mean"], gb, d["step_ms"], _d(d["floor_ms"]),
                     _d(d["x_floor"]), _d(col)))  # fmt: skip
        if b == GOAL_70B_BATCH and d["x_floor"] is not None:
            met = d["x_floor"] <= GOAL_70B_X_FLOOR
            verdict += f"{'MET' if met else 'NOT MET'} ({d['x_floor']:.2f}x)"
    if "MET" not in verdict:
        verdict += "not measured"
    return rows, verdict


def render(r: dict[str, dict[str, Any] | None]) -> str:
    missing = [n for n, v in r.items() if v is None]
    parts = [f"missing (stage failed or timed out): {', '.join(missing)}" if missing else ""]
    col = r["collectives"]
    if col:
        parts.append(f"NCCL all-reduce bus bandwidth over {col['tp']} GPUs: "
                     f"{col['busbw_gbs']:.0f} GB/s (largest size); one decode step's "
                     "collectives (graph replay) vs their bytes at that bandwidth:")  # fmt: skip
        parts.append(_table(
            ["shape", "batch", "all-reduces", "KiB each", "step ms", "at busbw ms", "us each"],
            [(c["shape"], c["batch"], c["all_reduces"], c["all_reduce_bytes"] / 1024,
              c["step_ms"], c["at_busbw_ms"], c["per_all_reduce_us"]) for c in col["steps"]],
        ))  # fmt: skip
    bw = (r["offline_8b_tp2"] or r["offline_8b_tp1"] or {}).get("read_bandwidth_gbs")
    measured = f"{bw:.0f} GB/s" if bw else "not measured (no GPU)"
    parts.append(f"\nHBM read bandwidth (one GPU, same run): {measured}\n")
    parts.append("Llama-3-8B decode step (async), TP=2 vs TP=1; collectives: one step's "
                 "all-reduces + logits gather, replayed alone:")  # fmt: skip
    parts.append(_table(["batch", "TP1 ms", "TP2 ms", "speed-up", "TP2 floor ms",
                               "TP2 x floor", "collectives ms", "% of TP2 step"],
                              decode_8b(r)))  # fmt: skip
    parts.append("\noffline throughput (random workload):")
    parts.append(_table(["run", "prompts", "in/out", "output tok/s", "total tok/s",
                               "preemptions"], throughput(r)))  # fmt: skip
    rows, verdict = decode_70b(r)
    parts.append("\nLlama-3-70B decode step, TP=2, vs the floor (weights + KV one GPU reads):")
    parts.append(_table(["batch", "ctx", "GB/GPU", "step ms", "floor ms", "x floor",
                               "collectives ms"], rows))  # fmt: skip
    parts.append(verdict)
    return "\n".join(p for p in parts if p is not None)


def _table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    return format_table(headers, rows) if rows else "  (no data)"


def _d(value: float | None) -> float | str:
    return "-" if value is None else value


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vtensor.bench.tp_report DIR", file=sys.stderr)
        return 2
    print(render(load(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
