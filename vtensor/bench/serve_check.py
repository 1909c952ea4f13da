"""``vtensor bench serve --check-metrics``: after a run, no request lost and no KV live.

The bench reads the server's ``/metrics`` before the run and again once the server is
idle after it (``requests_running`` and ``requests_waiting`` both 0, polled up to
``--check-timeout`` seconds), and checks, over the run's deltas (engine requests: the
bench sends ``n = 1``, so one per HTTP request):

- **lost** = submitted − ended − running − waiting must be 0, where *submitted* is
  ``vtensor_requests_submitted_total`` (requests the server accepted) and *ended* the
  sum of ``vtensor_requests_finished_total`` over its reasons (stop, length, abort);
- **server and client agree**: submitted equals the requests the client saw accepted
  (HTTP 200), and every accepted request the client did not disconnect ended with its
  ``[DONE]`` (a stream cut short is *cut*, and counts as lost);
- **no KV live**: ``vtensor_kv_live_bytes`` and ``vtensor_kv_mapped_bytes`` (KV of
  running requests) are 0. Idle slots keep their chunks by design (deferred
  reclamation, ``vtensor_kv_chunks_idle``): reusable, not live, not checked.

Client disconnects (``--abort-fraction``) are reported next to the server's abort
count; a request that finished before its disconnect arrived counts as finished, so
the server may count fewer aborts than the client made. The deltas assume the bench is
the server's only client during the run.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .serve_client import Endpoint, RequestResult

REASONS = ("stop", "length", "abort")
_LINE = re.compile(r"^(vtensor_[a-z_]+(?:\{[^}]*\})?) (\S+)$", re.MULTILINE)


def parse_metrics(text: str) -> dict[str, float]:
    """``name`` or ``name{labels}`` to value, for vtensor's own series."""
    return {m.group(1): float(m.group(2)) for m in _LINE.finditer(text)}


async def read_metrics(session: Any, ep: Endpoint) -> dict[str, float]:
    async with session.get(f"{ep.base_url}/metrics", headers=ep.headers()) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise ValueError(f"GET /metrics answered {resp.status}: {text[:200]}")
    values = parse_metrics(text)
    if "vtensor_requests_submitted_total" not in values:
        raise ValueError("/metrics has no vtensor_requests_submitted_total: "
                         "--check-metrics needs a vtensor server")  # fmt: skip
    return values


async def read_when_idle(session: Any, ep: Endpoint, timeout_s: float) -> dict[str, float]:
    """/metrics once nothing runs or waits (client aborts take a step to land), or as it
    is at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = await read_metrics(session, ep)
        idle = not values["vtensor_requests_running"] and not values["vtensor_requests_waiting"]
        if idle or time.monotonic() >= deadline:
            return values
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    want: float
    ok: bool


def check_run(
    before: dict[str, float], after: dict[str, float], results: Sequence[RequestResult]
) -> list[Check]:
    """The checks of one run (see the module docstring)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    ended = {r: delta(f'vtensor_requests_finished_total{{reason="{r}"}}') for r in REASONS}
    submitted = delta("vtensor_requests_submitted_total")
    running, waiting = after["vtensor_requests_running"], after["vtensor_requests_waiting"]
    accepted = sum(r.accepted for r in results)
    cut = sum(r.accepted and not r.aborted and not r.done for r in results)
    lost = submitted - sum(ended.values()) - running - waiting
    agree = submitted == accepted
    checks = [
        Check("lost (submitted - ended - running - waiting)", lost, 0, lost == 0),
        Check("requests still running", running, 0, running == 0),
        Check("requests still waiting", waiting, 0, waiting == 0),
        Check("submitted (server) - accepted (client)", submitted - accepted, 0, agree),
        Check("streams cut short (client)", cut, 0, cut == 0),
    ]
    for name in ("vtensor_kv_live_bytes", "vtensor_kv_mapped_bytes"):
        checks.append(Check(f"{name.removeprefix('vtensor_')} after the run", after[name], 0,
                            after[name] == 0))  # fmt: skip
    return checks


def check_summary(checks: Sequence[Check], before: dict[str, float], after: dict[str, float],
                  results: Sequence[RequestResult]) -> dict[str, Any]:  # fmt: skip
    """What the JSON keeps: the checks, and the counts behind them."""
    finished = {
        r: after.get(f'vtensor_requests_finished_total{{reason="{r}"}}', 0.0)
        - before.get(f'vtensor_requests_finished_total{{reason="{r}"}}', 0.0)
        for r in REASONS
    }
    return {
        "ok": all(c.ok for c in checks),
        "checks": [vars(c) for c in checks],
        "submitted": after["vtensor_requests_submitted_total"]
        - before["vtensor_requests_submitted_total"],
        "finished": finished,
        "client_accepted": sum(r.accepted for r in results),
        "client_aborted": sum(r.aborted for r in results),
        "kv_chunks_in_use_after": after.get("vtensor_kv_chunks_in_use"),
        "kv_chunks_idle_after": after.get("vtensor_kv_chunks_idle"),
    }


def format_check(summary: dict[str, Any]) -> str:
    lines = [" Metrics check ".center(50, "=")]
    for c in summary["checks"]:
        mark = "ok" if c["ok"] else "FAIL"
        lines.append(f"{c['name'] + ':':<44}{c['value']:<8g}{mark}")
    f = summary["finished"]
    lines.append(f"{'submitted / stop / length / abort:':<44}{summary['submitted']:g} / "
                 f"{f['stop']:g} / {f['length']:g} / {f['abort']:g}")  # fmt: skip
    lines.append(f"{'client: accepted / disconnected on purpose:':<44}"
                 f"{summary['client_accepted']} / {summary['client_aborted']}")  # fmt: skip
    lines.append("=" * 50)
    return "\n".join(lines)
