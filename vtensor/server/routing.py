"""Several models in one server: each request goes to the engine its OpenAI ``model``
field names (``vtensor serve --model A --model B``).

Each model has its own engine, engine thread (``AsyncEngine``) and metrics; their KV
memory comes from one ``SharedKVPool``. A request without ``model`` goes to the first
model (the only one, in a one-model server); an unknown name is a 404 in OpenAI's
error shape. ``/metrics`` labels every sample with its model (``label_metrics``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .async_engine import AsyncEngine
from .errors import APIError
from .metrics import ServerMetrics
from .served_model import ServedModel


@dataclass(frozen=True)
class Route:
    model: ServedModel
    runner: AsyncEngine
    metrics: ServerMetrics


class ModelRoutes:
    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("a server needs at least one model")
        names = [r.model.name for r in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must differ, got {names}")
        self.routes = list(routes)
        self._by_name = {r.model.name: r for r in routes}

    @property
    def first(self) -> Route:
        return self.routes[0]

    @property
    def single(self) -> bool:
        return len(self.routes) == 1

    def get(self, name: str | None) -> Route:
        """The route of model ``name`` (None: the first); 404 if no model has it."""
        if name is None:
            return self.first
        route = self._by_name.get(name)
        if route is None:
            if self.single:
                self.first.model.check_name(name)  # the one-model server's own message
            served = ", ".join(repr(n) for n in self._by_name)
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {served}", "model"
            )
        return route


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?( .*)$")


def label_metrics(bodies: Sequence[tuple[str, str]]) -> str:
    """Prometheus expositions of several models merged into one: every sample gains a
    ``model`` label, and each metric family keeps one HELP/TYPE header with all the
    models' samples under it (the text format wants a family's samples together)."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for model, body in bodies:
        family = ""
        for line in body.splitlines():
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                family = parts[2] if len(parts) > 2 else family
                if family not in headers:
                    order.append(family)
                    headers[family], samples[family] = [], []
                if line not in headers[family]:
                    headers[family].append(line)
                continue
            m = _SAMPLE.match(line)
            if m is None or not family:
                continue
            name, labels, rest = m.group(1), m.group(2), m.group(3)
            label = f'model="{_escape(model)}"'
            inner = label if not labels else f"{label},{labels[1:-1]}"
            samples[family].append(f"{name}{{{inner}}}{rest}")
    lines = [x for family in order for x in (*headers[family], *samples[family])]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
