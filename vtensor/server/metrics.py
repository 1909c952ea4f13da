"""Prometheus metrics for ``/metrics``, in the text exposition format (no dependency).

Latency histograms are observed on the engine thread and rendered on the HTTP
thread, so every access goes through one lock.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from vtensor.engine.memory_stats import MemoryStats
from vtensor.engine.stats import EngineStats

from .engine_metrics import engine_metrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # the tokens/s gauge averages over this window


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.submitted = 0  # engine requests accepted: each ends as one of `finished`
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def observe_submitted(self, n: int) -> None:
        with self._lock:
            self.submitted += n

    def observe_first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)

    def observe_finished(
        self,
        reason: str,
        e2e_s: float,
        first: float | None,
        end: float,
        output_tokens: int,
        prompt_tokens: int,
    ) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.e2e.observe(e2e_s)
            self.prompt_tokens += prompt_tokens
            if first is not None and output_tokens > 1:
                # TPOT as the benchmarks define it: decode time over the tokens after the first.
                self.tpot.observe((end - first) / (output_tokens - 1))

    def observe_aborted(self) -> None:
        with self._lock:
            self.finished["abort"] += 1

    def add_tokens(self, n: int, now: float) -> None:
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_s(self, now: float) -> float:
        with self._lock:
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def render(self, stats: EngineStats, now: float, memory: MemoryStats | None = None) -> str:
        """The whole exposition: engine gauges from ``stats`` (and the held bytes from
        ``memory``), then the server's own."""
        rate = self.tokens_per_s(now)
        gauges, counters = engine_metrics(stats, rate, RATE_WINDOW_S, memory)
        lines: list[str] = []
        for name, help_text, value in gauges:
            lines += _scalar(f"vtensor_{name}", help_text, "gauge", value)
        for name, help_text, value in counters:
            lines += _scalar(f"vtensor_{name}", help_text, "counter", value)
        return "\n".join(lines + self._own_lines()) + "\n"

    def _own_lines(self) -> list[str]:
        """What the server observed itself: tokens, finished requests, latency histograms."""
        lines: list[str] = []
        with self._lock:
            lines += _scalar(
                "vtensor_prompt_tokens_total", "Prompt tokens of finished requests",
                "counter", self.prompt_tokens,
            )  # fmt: skip
            lines += _scalar(
                "vtensor_generation_tokens_total", "Tokens generated", "counter",
                self.generation_tokens,
            )  # fmt: skip
            lines += _scalar(
                "vtensor_requests_submitted_total",
                "Requests accepted (each sample of n); each ends in requests_finished_total",
                "counter", self.submitted,
            )  # fmt: skip
            lines += ["# HELP vtensor_requests_finished_total Requests ended, by reason",
                      "# TYPE vtensor_requests_finished_total counter"]  # fmt: skip
            for reason in ("stop", "length", "abort"):
                lines.append(
                    f'vtensor_requests_finished_total{{reason="{reason}"}} {self.finished[reason]}'
                )
            lines += self.ttft.render("vtensor_time_to_first_token_seconds", "Time to first token")
            lines += self.tpot.render(
                "vtensor_time_per_output_token_seconds", "Time per output token after the first"
            )
            lines += self.e2e.render("vtensor_e2e_request_latency_seconds", "Request latency")
        return lines


def _scalar(name: str, help_text: str, kind: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
