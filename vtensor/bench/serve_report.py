"""Run the sweep of ``vtensor bench serve`` and report it: tables, JSON, a plot."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import Any

from .report import environment, format_table, write_json
from .serve import RunArgs, run_workload
from .serve_metrics import SLO, format_result, per_turn, summarize
from .serve_workloads import WorkloadArgs, build_workload


async def run_all(args: Any, wargs: WorkloadArgs) -> int:
    import aiohttp

    from .serve_client import Endpoint, fetch_model

    tokenizer = None
    if args.tokenizer is not None:
        from vtensor.models.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.tokenizer)
        wargs = replace(wargs, vocab_size=tokenizer.vocab_size)
    base = args.base_url.rstrip("/").removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        model = args.model or await fetch_model(session, base, args.api_key)
    ep = Endpoint(base, model, args.api_key, args.ignore_eos)
    convs = build_workload(wargs)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    print(f"{args.dataset}: {len(convs)} conversations, {sum(len(c.turns) for c in convs)} "
          f"requests, against {base} ({model})", file=sys.stderr)  # fmt: skip
    runs = []
    for rate in args.request_rate:
        run = RunArgs(rate, args.burstiness, args.max_concurrency, args.seed)
        before = await server_prefix_counters(base)
        results, duration = await run_workload(ep, convs, run, tokenizer, progress=True)
        summary = {"request_rate": rate, **asdict(run), **summarize(results, duration, slo)}
        counters = prefix_counters_delta(before, await server_prefix_counters(base))
        if counters:
            summary["server_prefix_cache"] = counters
        print(format_result(summary, f" Serving Benchmark Result (rate {rate:g}) "))
        if counters:
            print(_prefix_line(counters))
        if max(len(c.turns) for c in convs) > 1:
            summary["per_round"] = per_turn(results)
            print(_round_table(summary["per_round"]))
        if summary["failed"]:
            print(f"{summary['failed']} requests failed, e.g. {summary['errors'][:2]}",
                  file=sys.stderr)  # fmt: skip
        runs.append(summary)
    payload = {
        "benchmark": "serve", "label": args.label or args.dataset, "model": model,
        "base_url": base, "workload": asdict(wargs), "environment": environment(),
        "runs": [_jsonable(r) for r in runs],
    }  # fmt: skip
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .serve_plot import plot

        plot(payload, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r["completed"] for r in runs) else 1


def _round_table(rows: list[dict[str, Any]]) -> str:
    headers = ["round", "requests", "mean prompt", "cached %", "TTFT avg ms", "TTFT p50",
               "TTFT p90", "latency avg ms", "latency p50", "latency p90"]  # fmt: skip
    body = [[r["round"], r["requests"], r["mean_prompt_len"],
             100 * r.get("mean_cached_tokens", 0.0) / max(r["mean_prompt_len"], 1),
             r["mean_ttft_ms"], r["median_ttft_ms"], r["p90_ttft_ms"], r["mean_e2el_ms"],
             r["median_e2el_ms"], r["p90_e2el_ms"]] for r in rows]  # fmt: skip
    return format_table(headers, body)


PREFIX_COUNTERS = ("prefix_cache_queries_total", "prefix_cache_hits_total",
                   "prefix_cache_evicted_chunks_total", "prefix_cache_chunks")  # fmt: skip


async def server_prefix_counters(base: str) -> dict[str, float]:
    """vtensor's prefix-cache counters from the server's ``/metrics`` (empty for a server
    without them, or without ``/metrics``)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
            text = await resp.text() if resp.status == 200 else ""
    except aiohttp.ClientError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.removeprefix("vtensor_") in PREFIX_COUNTERS:
            values[name.removeprefix("vtensor_")] = float(value)
    return values


def prefix_counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's prefix-cache activity during one run: queried and hit prompt tokens,
    their ratio, chunks evicted, and the chunks cached at the end."""
    if not after or not before:
        return {}
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    return {
        "query_tokens": queries,
        "hit_tokens": hits,
        "hit_rate": hits / queries if queries else 0.0,
        "evicted_chunks": after["prefix_cache_evicted_chunks_total"]
        - before["prefix_cache_evicted_chunks_total"],
        "cached_chunks_at_end": after["prefix_cache_chunks"],
    }


def _prefix_line(c: dict[str, float]) -> str:
    return (f"server prefix cache: {100 * c['hit_rate']:.1f}% of {c['query_tokens']:.0f} "
            f"queried prompt tokens hit; {c['evicted_chunks']:.0f} chunks evicted, "
            f"{c['cached_chunks_at_end']:.0f} cached at the end")  # fmt: skip


def _jsonable(run: dict[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: an all-at-once run is written as the string "inf".
    return {k: ("inf" if v == float("inf") else v) for k, v in run.items()}
