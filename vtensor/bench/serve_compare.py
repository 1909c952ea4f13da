"""``vtensor bench compare``: two ``bench serve`` results side by side (prefix caching
on vs off, or any A/B of one workload): throughput and latency ratios per run, and
per round for multi-turn, with the prefix-cache hit rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import format_table, write_json


def add_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("compare", help="two `bench serve` JSON results side by side")
    p.add_argument("a", help="JSON of `bench serve --json` (e.g. prefix caching on)")
    p.add_argument("b", help="JSON of the same workload (e.g. prefix caching off)")
    p.add_argument("--names", default="on,off", help="what A and B are (default: on,off)")
    p.add_argument("--json", default=None, help="write the comparison to this path")


def load(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("benchmark") != "serve" or not data.get("runs"):
        raise ValueError(f"{path} is not a `vtensor bench serve --json` result")
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Run by run (matched by position: the same sweep), A's figures, B's and B/A or A/B
    so that every ratio reads "how many times better A is"."""
    if a["workload"] != b["workload"]:
        raise ValueError("the two results ran different workloads; compare like with like")
    if len(a["runs"]) != len(b["runs"]):
        raise ValueError("the two results have different request-rate sweeps")
    runs = []
    for ra, rb in zip(a["runs"], b["runs"]):
        row: dict[str, Any] = {"request_rate": ra["request_rate"]}
        for key in ("request_throughput", "output_throughput"):
            row[key] = (ra[key], rb[key], _ratio(ra[key], rb[key]))
        for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms"):
            row[key] = (ra[key], rb[key], _ratio(rb[key], ra[key]))
        row["hit_rate"] = (_hit_rate(ra), _hit_rate(rb))
        if "per_round" in ra and "per_round" in rb:
            row["per_round"] = [_round(x, y) for x, y in zip(ra["per_round"], rb["per_round"])]
        runs.append(row)
    return {"a": a["label"], "b": b["label"], "runs": runs}


def _round(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
    ta, tb = x["median_ttft_ms"], y["median_ttft_ms"]
    cached = 100 * x.get("mean_cached_tokens", 0.0) / max(x["mean_prompt_len"], 1)
    return {"round": x["round"], "median_ttft_ms": (ta, tb, _ratio(tb, ta)), "cached_pct": cached}


METRICS = [
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("median_e2el_ms", "E2E p50 ms"),
]


def print_comparison(cmp: dict[str, Any], names: tuple[str, str]) -> None:
    na, nb = names
    print(f"A = {na}: {cmp['a']}\nB = {nb}: {cmp['b']}")
    headers = ["rate", "metric", na, nb, f"{na} better by"]
    body: list[list[object]] = []
    for run in cmp["runs"]:
        rate = str(run["request_rate"])
        for key, label in METRICS:
            x, y, r = run[key]
            body.append([rate, label, x, y, f"{r:.2f}x"])
        ha, hb = run["hit_rate"]
        body.append([rate, "prefix hit %", 100 * ha, 100 * hb, ""])
    print(format_table(headers, body))
    for run in cmp["runs"]:
        if "per_round" in run:
            print(f"\nper round (rate {run['request_rate']}):")
            rows = [
                [r["round"], *r["median_ttft_ms"][:2], f"{r['median_ttft_ms'][2]:.2f}x",
                 r["cached_pct"]]
                for r in run["per_round"]
            ]  # fmt: skip
            headers = ["round", f"TTFT p50 {na}", f"TTFT p50 {nb}", f"{na} lower by",
                       f"cached % ({na})"]  # fmt: skip
            print(format_table(headers, rows))


def main(args: Any) -> int:
    names = tuple(args.names.split(","))
    if len(names) != 2:
        raise ValueError("--names takes two comma-separated names")
    cmp = compare(load(args.a), load(args.b))
    print_comparison(cmp, (names[0], names[1]))
    if args.json:
        write_json(args.json, {"benchmark": "serve-compare", "names": names, **cmp})
    return 0


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("inf")


def _hit_rate(run: dict[str, Any]) -> float:
    """The server's own count where it reported one, else the responses' cached tokens."""
    server = run.get("server_prefix_cache")
    return float(server["hit_rate"]) if server else float(run.get("cached_token_ratio", 0.0))
