"""Small helpers shared by benchmark scripts: environment facts, tables, JSON."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Facts that make a result reproducible: device, versions, date."""
    import torch  # here, so that the HTTP benchmark client starts without loading torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            from cuda.bindings import driver

            err, version = driver.cuDriverGetVersion()
            env["cuda_driver_api"] = int(version) if int(err) == 0 else None
        except Exception:  # pragma: no cover - informational only
            env["cuda_driver_api"] = None
    return env


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (no extra dependency)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    # Text columns read best left-aligned, numbers right-aligned.
    left = [all(isinstance(row[i], str) for row in rows) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) if lf else h.rjust(w) for h, w, lf in zip(headers, widths, left))
    out = [line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(r, widths, left)))
    return "\n".join(out)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
