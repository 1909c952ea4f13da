"""Rates, summaries and tables of ``vtensor bench kernels`` (the graph-replay decode
figures and goals: ``kernel_graph_report.py``)."""

from __future__ import annotations

from typing import Any

from .kernel_graph_report import add_graph_rates, graph_summary, print_graph
from .report import format_table

# sglang: SGLang's kernels with vtensor's split count; sglang_own: with SGLang's own.
PEERS = ("vtensor", "fa2", "sglang", "sglang_own")
NAN = float("nan")


def add_rates(r: dict, work: str, unit: str, per_ms: float) -> None:
    """``r[peer_unit] = r[work] / r[peer_ms] / per_ms`` for each measured peer, and our
    speed-up over each peer that ran."""
    for peer in PEERS:
        if f"{peer}_ms" in r:
            r[f"{peer}_{unit}"] = r[work] / r[f"{peer}_ms"] / per_ms
            if peer != "vtensor":
                r[f"speedup_vs_{peer}"] = r[f"{peer}_ms"] / r["vtensor_ms"]


def share_sglang(res: dict[str, Any]) -> None:
    """SGLang reads a token pool of its own, the same whatever arena we read: the VMM
    rows borrow the dense pass's SGLang times (eager and graph), split counts and
    errors for their ratios."""
    for part, keys, work, unit, per_ms in (
        ("decode", ("config", "batch", "ctx"), "bytes", "gbs", 1e6),
        ("extend", ("config", "batch", "prefix", "new"), "flops", "tflops", 1e9),
    ):
        dense = {tuple(r[k] for k in keys): r for r in res[part] if r["arena"] == "dense"}
        for r in res[part]:
            src = dense.get(tuple(r[k] for k in keys))
            if r["arena"] == "dense" or "vtensor_ms" not in r or not src:
                continue
            for peer in ("sglang", "sglang_own"):
                for field in ("ms", "graph_ms", "splits", "err", "error"):
                    if f"{peer}_{field}" in src:
                        r[f"{peer}_{field}"] = src[f"{peer}_{field}"]
            r["sglang_from"] = "dense pass"
            add_rates(r, work, unit, per_ms)
            if part == "decode":
                add_graph_rates(r, res["read_gbs"])


def summaries(res: dict[str, Any]) -> None:
    share_sglang(res)
    res["decode_summary"], res["extend_summary"] = {}, {}
    for arena in sorted({r["arena"] for r in res["decode"] + res["extend"]}):
        big = [
            r
            for r in res["decode"]
            if r["arena"] == arena and "vtensor_ms" in r and r["batch"] * r["ctx"] >= 32 * 4096
        ]
        res["decode_summary"][arena] = {
            "points_batch_x_ctx_ge_32x4k": len(big),
            "min_pct_of_read_ceiling": _min(big, "vtensor_pct_of_read_ceiling"),
            "min_speedup_vs_sglang_vtensor_splits": _min(big, "speedup_vs_sglang"),
            "min_speedup_vs_sglang_own_splits": _min(big, "speedup_vs_sglang_own"),
            **graph_summary([r for r in res["decode"] if r["arena"] == arena]),
        }
        ext = [r for r in res["extend"] if r["arena"] == arena and "vtensor_ms" in r]
        with_sgl = [r["speedup_vs_sglang"] for r in ext if "speedup_vs_sglang" in r]
        res["extend_summary"][arena] = {
            "mean_speedup_vs_sglang": sum(with_sgl) / len(with_sgl) if with_sgl else None,
            "min_speedup_vs_fa2_long_prefix": _min(
                [r for r in ext if r["prefix"] >= 4096], "speedup_vs_fa2"
            ),
        }


def _min(rows: list[dict], key: str) -> float | None:
    return min((r[key] for r in rows if key in r), default=None)


def print_tables(res: dict[str, Any]) -> None:
    print(
        f"\nceilings: read {res['read_gbs']:.0f} GB/s, copy {res['copy_gbs']:.0f} GB/s "
        f"(R+W); SGLang {'loaded' if res['sglang'] else 'NOT available'}"
    )
    print_graph(res["decode"], res["read_gbs"])
    print(
        "\nDecode, eager (do_bench of one call: L2 flushed, the host's launch work included; "
        "GB/s of K/V read;\n% of measured read ceiling). Arena dense: torch.empty, "
        "max_len = ctx;\nvmm: a VMM KVArena as the engine's (chunks mapped on demand), "
        f"max_len = max(max_model_len {res['max_model_len']}, ctx). SGLang on its own token "
        "pool,\nwith vtensor's split count (vt splits) and its own heuristic's (own splits, "
        "max shown)."
    )
    dec = [r for r in res["decode"] if "vtensor_ms" in r]
    headers = ["config", "arena", "max_len", "batch", "ctx", "vtensor", "%ceil",
               "sglang vt splits", "sglang own splits", "own splits", "fa2", "x sglang vt",
               "x sglang own"]  # fmt: skip
    dec_table = [
        (r["config"], r["arena"], r["max_len"], r["batch"], r["ctx"], r["vtensor_gbs"],
         r["vtensor_pct_of_read_ceiling"], r.get("sglang_gbs", NAN),
         r.get("sglang_own_gbs", NAN), r.get("sglang_own_splits", "-"), r.get("fa2_gbs", NAN),
         r.get("speedup_vs_sglang", NAN), r.get("speedup_vs_sglang_own", NAN))
        for r in dec
    ]  # fmt: skip
    print(format_table(headers, dec_table))
    skipped = [
        f"{r['arena']} {r['config']} {r['batch']}x{r['ctx']}"
        for r in res["decode"]
        if "skipped" in r
    ]
    if skipped:
        print("skipped (arena over budget): " + ", ".join(skipped))
    ext = [r for r in res["extend"] if "vtensor_ms" in r]
    if ext:
        _print_extend(ext)
    for key, label in (("decode_summary", "decode"), ("extend_summary", "extend")):
        for arena, summary in res[key].items():
            print(f"{label} summary [{arena}]: {summary}")


def _print_extend(ext: list[dict]) -> None:
    print(f"\nExtend (TFLOP/s, batch {ext[0]['batch']})")
    ext_headers = ["arena", "prefix", "new", "vtensor", "sglang", "fa2", "x sglang", "x fa2"]
    ext_table = [
        (r["arena"], r["prefix"], r["new"], r["vtensor_tflops"], r.get("sglang_tflops", NAN),
         r["fa2_tflops"], r.get("speedup_vs_sglang", NAN), r["speedup_vs_fa2"])
        for r in ext
    ]  # fmt: skip
    print(format_table(ext_headers, ext_table))
