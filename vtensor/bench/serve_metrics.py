"""Serving metrics (NOTES §5, vLLM's definitions) and their vLLM-shaped table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .serve_client import RequestResult


@dataclass(frozen=True)
class SLO:
    """Goodput counts requests meeting every given bound (milliseconds)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        return (
            (self.ttft_ms is None or r.ttft * 1e3 <= self.ttft_ms)
            and (self.tpot_ms is None or _tpot(r) * 1e3 <= self.tpot_ms)
            and (self.e2e_ms is None or r.latency * 1e3 <= self.e2e_ms)
        )

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


def _tpot(r: RequestResult) -> float:
    """(latency - TTFT) / (output - 1); 0 for a one-token output."""
    return (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(name: str, values_s: Sequence[float], pcts: Sequence[int]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
    }
    for p in pcts:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: SLO, pcts: Sequence[int] = (99,)
) -> dict[str, Any]:
    # Requests the client disconnected on purpose (--abort-fraction) are neither
    # completed nor failed, and stay out of the latency figures.
    ok = [r for r in results if r.ok and not r.aborted]
    aborted = [r for r in results if r.aborted]
    inputs = sum(r.prompt_len for r in ok)
    outputs = sum(r.output_len for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok) - len(aborted),
        "aborted": len(aborted),
        "errors": sorted({r.error for r in results if not r.ok and not r.aborted})[:5],
        "duration_s": duration_s,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": outputs / duration_s,
        "total_token_throughput": (inputs + outputs) / duration_s,
        # Prompt tokens the server said it served from its prefix cache (OpenAI's
        # usage.prompt_tokens_details.cached_tokens; 0 where a server does not say).
        "total_cached_tokens": cached,
        "cached_token_ratio": cached / inputs if inputs else 0.0,
    }
    if slo.any:
        summary["goodput"] = sum(slo.met(r) for r in ok) / duration_s
    summary |= _stats("ttft", [r.ttft for r in ok], pcts)
    summary |= _stats("tpot", [_tpot(r) for r in ok if r.output_len > 1], pcts)
    summary |= _stats("itl", [g for r in ok for g in r.itl], pcts)
    summary |= _stats("e2el", [r.latency for r in ok], pcts)
    return summary


def per_turn(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """SGLang bench_multiturn's view: TTFT and latency (avg, median, p90) per round."""
    rounds = sorted({r.turn for r in results})
    out = []
    for t in rounds:
        ok = [r for r in results if r.turn == t and r.ok]
        mean_prompt = statistics.fmean([r.prompt_len for r in ok]) if ok else 0.0
        mean_cached = statistics.fmean([r.cached_tokens for r in ok]) if ok else 0.0
        row: dict[str, Any] = {"round": t + 1, "requests": len(ok), "mean_prompt_len": mean_prompt,
                               "mean_cached_tokens": mean_cached}  # fmt: skip
        row |= _stats("ttft", [r.ttft for r in ok], (90,))
        row |= _stats("e2el", [r.latency for r in ok], (90,))
        out.append(row)
    return out


SECTIONS = [("ttft", "Time to First Token", "TTFT"),
            ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
            ("itl", "Inter-token Latency", "ITL"),
            ("e2el", "End-to-end Latency", "E2EL")]  # fmt: skip


def format_result(s: dict[str, Any], title: str = " Serving Benchmark Result ") -> str:
    """The table vLLM's ``benchmark_serving`` prints, with the same labels."""
    lines = [title.center(50, "=")]

    def row(label: str, value: object) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:<10}")

    row("Successful requests:", s["completed"])
    if s["failed"]:
        row("Failed requests:", s["failed"])
    if s.get("aborted"):
        row("Disconnected mid-stream (client):", s["aborted"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    if "goodput" in s:
        row("Request goodput (req/s):", s["goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total Token throughput (tok/s):", s["total_token_throughput"])
    if s.get("total_cached_tokens"):
        row("Cached prompt tokens:", s["total_cached_tokens"])
        row("Prefix cache hit rate (%):", 100 * s["cached_token_ratio"])
    for key, header, short in SECTIONS:
        lines.append(header.center(50, "-"))
        row(f"Mean {short} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", s[f"median_{key}_ms"])
        for name in sorted(k for k in s if k.startswith("p") and k.endswith(f"_{key}_ms")):
            row(f"P{name[1:].split('_')[0]} {short} (ms):", s[name])
    lines.append("=" * 50)
    return "\n".join(lines)
