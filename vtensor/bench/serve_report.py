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
        results, duration = await run_workload(ep, convs, run, tokenizer, progress=True)
        summary = {"request_rate": rate, **asdict(run), **summarize(results, duration, slo)}
        print(format_result(summary, f" Serving Benchmark Result (rate {rate:g}) "))
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
    headers = ["round", "requests", "mean prompt", "TTFT avg ms", "TTFT p50", "TTFT p90",
               "latency avg ms", "latency p50", "latency p90"]  # fmt: skip
    body = [[r["round"], r["requests"], r["mean_prompt_len"], r["mean_ttft_ms"],
             r["median_ttft_ms"], r["p90_ttft_ms"], r["mean_e2el_ms"], r["median_e2el_ms"],
             r["p90_e2el_ms"]] for r in rows]  # fmt: skip
    return format_table(headers, body)


def _jsonable(run: dict[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: an all-at-once run is written as the string "inf".
    return {k: ("inf" if v == float("inf") else v) for k, v in run.items()}
