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
        run = RunArgs(rate, args.burstiness, args.max_concurrency, args.seed, args.abort_fraction)
        before = await _metrics(ep) if args.check_metrics else None
        prefix_before = await server_prefix_counters(ep)
        results, duration = await run_workload(ep, convs, run, tokenizer, progress=True)
        summary = {"request_rate": rate, **asdict(run), **summarize(results, duration, slo)}
        counters = prefix_counters_delta(prefix_before, await server_prefix_counters(ep))
        if counters:
            summary["server_prefix_cache"] = counters
        print(format_result(summary, f" Serving Benchmark Result (rate {rate:g}) "))
        if counters:
            print(_prefix_line(counters))
        if before is not None:
            summary["check"] = await _check(ep, before, results, args.check_timeout)
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
    checks_ok = all(r["check"]["ok"] for r in runs if "check" in r)
    return 0 if all(r["completed"] for r in runs) and checks_ok else 1


async def _metrics(ep: Any) -> dict[str, float]:
    import aiohttp

    from .serve_check import read_metrics

    async with aiohttp.ClientSession() as session:
        return await read_metrics(session, ep)


async def _check(ep: Any, before: dict[str, float], results: Any, timeout_s: float) -> Any:
    """The metrics check of one run (``serve_check``), printed; failures to stderr."""
    import aiohttp

    from .serve_check import check_run, check_summary, format_check, read_when_idle

    async with aiohttp.ClientSession() as session:
        after = await read_when_idle(session, ep, timeout_s)
    summary = check_summary(check_run(before, after, results), before, after, results)
    print(format_check(summary))
    if not summary["ok"]:
        failed = [c["name"] for c in summary["checks"] if not c["ok"]]
        print(f"metrics check FAILED: {', '.join(failed)}", file=sys.stderr)
    return summary


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


async def server_prefix_counters(ep: Any) -> dict[str, float]:
    """vtensor's prefix-cache counters from the server's ``/metrics`` (empty for a server
    without them, or whose ``/metrics`` does not answer; sent with the API key, which
    ``--protect-metrics`` asks for)."""
    import aiohttp

    from .serve_check import parse_metrics

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{ep.base_url}/metrics", headers=ep.headers()) as resp,
        ):
            text = await resp.text() if resp.status == 200 else ""
    except aiohttp.ClientError:
        return {}
    values = parse_metrics(text)
    return {
        name: values[f"vtensor_{name}"] for name in PREFIX_COUNTERS if f"vtensor_{name}" in values
    }


def prefix_counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's prefix-cache activity during one run: queried and hit prompt tokens,
    their ratio, chunks evicted, and the chunks cached at the end."""
    if any(name not in c for c in (before, after) for name in PREFIX_COUNTERS):
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
