"""``--plot``: latency percentiles against request rate (or per round, multi-turn)."""

from __future__ import annotations

from typing import Any


def plot(payload: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'vtensor[plot]'") from exc
    runs = payload["runs"]
    multiturn = "per_round" in runs[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = [("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency")]
    if multiturn:
        _per_round(axes, runs[-1]["per_round"])
    else:
        # Categorical x: the sweep's rates in order, "inf" (all at once) included.
        rates = list(range(len(runs)))
        labels = [str(r["request_rate"]) for r in runs]
        for ax, (key, name) in zip(axes, metrics):
            for stat, style in (("median", "o-"), ("p99", "s--"), ("mean", "^:")):
                ax.plot(rates, [r[f"{stat}_{key}_ms"] for r in runs], style, label=stat)
            ax.set_xticks(rates, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(f"{name} (ms)")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
    gpu = payload.get("environment", {}).get("gpu", "")
    fig.suptitle(f"{payload['label']} — {payload['model']} {gpu}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_round(axes: Any, rows: list[dict[str, Any]]) -> None:
    rounds = [r["round"] for r in rows]
    for ax, (key, name) in zip(axes, [("ttft", "TTFT"), ("e2el", "latency")]):
        for stat, style in (("mean", "o-"), ("median", "s--"), ("p90", "^:")):
            ax.plot(rounds, [r[f"{stat}_{key}_ms"] for r in rows], style, label=stat)
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} per round")
        ax.grid(alpha=0.3)
        ax.legend()
    cached = [r.get("mean_cached_tokens", 0.0) for r in rows]
    computed = [r["mean_prompt_len"] - c for r, c in zip(rows, cached)]
    axes[2].bar(rounds, cached, label="from the prefix cache")
    axes[2].bar(rounds, computed, bottom=cached, label="computed")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("mean prompt tokens")
    axes[2].set_title("prompt length per round")
    axes[2].legend()
