"""Small-batch GEMV vs cuBLAS (``F.linear``) at the Llama-3-8B and 70B-TP2 linear shapes.

Every timing is CUDA-graph replay: R = 50 calls captured back to back, cycling over
≥ 8 distinct weight matrices of the shape (≥ 256 MiB, 5x the H100's 50 MB L2), so
each call streams its weight from HBM as in a decode step, with no launch overhead.
Reported: µs per call, GB/s of weight bytes, % of the copy ceiling (a 1 GiB
device-to-device copy timed in the same run: 2·bytes/time), speedup over cuBLAS.
Every GEMV output is checked against ``F.linear`` (both within the fp32 bound of
``reference.linear_error_bound``, so within twice it of each other); a point that
fails is reported and the run exits 1.

``--sweep`` also times a grid of configurations (``vtensor.bench.gemv_cases.sweep_grid``)
for each shape and M ≤ 8 and prints the best per point and per M (to set the table
in ``vtensor/kernels/gemv_config.py``); ``--budget-s`` bounds its time.

python3 benchmarks/gemv_bench.py --sweep --out /tmp/gemv.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton

from vtensor.bench.ceilings import copy_bandwidth
from vtensor.bench.gemv_cases import (
    SHAPE_SETS,
    GemvShape,
    best_per_bucket,
    model_shapes,
    sweep_grid,
)
from vtensor.bench.kernel_timing import graph_ms
from vtensor.kernels.gemv import _num_sms, gemv
from vtensor.kernels.gemv_config import MAX_M, GemvConfig, choose_config
from vtensor.kernels.reference import linear_error_bound

CALLS, MIN_WEIGHTS, ROTATE_BYTES = 50, 8, 256 << 20
DEVICE = "cuda"  # (a CPU dry run of the script patches it)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def timed_us(fn: Callable[[int], torch.Tensor], samples: int) -> float:
    """µs per call of ``CALLS`` calls ``fn(0..CALLS-1)`` captured in one graph."""
    calls = [lambda i=i: fn(i) for i in range(CALLS)]
    return 1000 * graph_ms(calls, samples=samples)


class Point:
    """One shape's weights (a rotation of distinct copies) and its M rows."""

    def __init__(self, shape: GemvShape, dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.bytes = shape.n * shape.k * dtype.itemsize
        count = max(MIN_WEIGHTS, math.ceil(ROTATE_BYTES / self.bytes))
        scale = shape.k**-0.5  # outputs of order 1, as a trained layer's
        self.weights = [
            (torch.randn(shape.n, shape.k, device=DEVICE) * scale).to(dtype) for _ in range(count)
        ]

    def x(self, m: int) -> torch.Tensor:
        return torch.randn(m, self.shape.k, device=DEVICE).to(self.dtype)

    def w(self, i: int) -> torch.Tensor:
        return self.weights[i % len(self.weights)]

    def check(self, x: torch.Tensor, config: GemvConfig | None) -> float:
        """Worst |ours - F.linear| over the allowed (2x the fp32 bound) on two weights;
        ≤ 1 passes."""
        worst = 0.0
        for w in (self.w(0), self.w(len(self.weights) - 1)):
            diff = (gemv(x, w, config).float() - F.linear(x, w).float()).abs()
            worst = max(worst, float((diff / (2 * linear_error_bound(x, w, x.dtype))).max()))
        return worst


def bench_point(p: Point, m: int, ceiling: float, samples: int) -> dict[str, Any]:
    x = p.x(m)
    gbs = lambda us: p.bytes / us / 1e3  # noqa: E731
    cublas = timed_us(lambda i: F.linear(x, p.w(i)), samples)
    row: dict[str, Any] = {
        "shape": p.shape.name, "n": p.shape.n, "k": p.shape.k, "m": m, "bytes": p.bytes,
        "cublas_us": cublas, "cublas_gbs": gbs(cublas), "cublas_pct": 100 * gbs(cublas) / ceiling,
    }  # fmt: skip
    if m <= MAX_M:
        cfg = choose_config(m, p.shape.n, p.shape.k, _num_sms(x.device))
        ours = timed_us(lambda i: gemv(x, p.w(i)), samples)
        row.update(
            config=cfg.label(), gemv_us=ours, gemv_gbs=gbs(ours),
            gemv_pct=100 * gbs(ours) / ceiling, speedup=cublas / ours, err=p.check(x, None),
        )  # fmt: skip
    return row


def sweep_point(p: Point, m: int, ceiling: float, deadline: float) -> list[dict[str, Any]]:
    x, rows = p.x(m), []
    for cfg in sweep_grid(m, p.shape.n, p.shape.k, _num_sms(x.device)):
        if time.monotonic() > deadline:
            break
        rec: dict[str, Any] = {"shape": p.shape.name, "m": m, "config": cfg.label()}
        try:
            rec["err"] = p.check(x, cfg)
            rec["us"] = timed_us(lambda i, c=cfg: gemv(x, p.w(i), c), samples=3)
            rec["pct"] = 100 * p.bytes / rec["us"] / 1e3 / ceiling
        except Exception as exc:  # a config that fails to compile or launch: recorded
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(rec)
    return rows


def print_bench(rows: list[dict[str, Any]]) -> None:
    print(f"{'shape':<18}{'N':>7}{'K':>7}{'M':>4} | {'gemv us':>8}{'GB/s':>7}{'%ceil':>6} | "
          f"{'cuBLAS us':>9}{'GB/s':>7}{'%ceil':>6} | {'speedup':>7}  config")  # fmt: skip
    for r in rows:
        ours = (
            f"{r['gemv_us']:8.1f}{r['gemv_gbs']:7.0f}{r['gemv_pct']:6.1f}"
            if "gemv_us" in r
            else f"{'-':>8}{'-':>7}{'-':>6}"
        )
        speed = f"{r['speedup']:7.2f}" if "speedup" in r else f"{'-':>7}"
        bad = "  WRONG" if r.get("err", 0) > 1 else ""
        print(f"{r['shape']:<18}{r['n']:>7}{r['k']:>7}{r['m']:>4} | {ours} | "
              f"{r['cublas_us']:9.1f}{r['cublas_gbs']:7.0f}{r['cublas_pct']:6.1f} | {speed}  "
              f"{r.get('config', '')}{bad}")  # fmt: skip


KEYS = ("gemv_us", "cublas_us")


KEYS = ("gemv_us", "cublas_us")


def print_step_totals(rows: list[dict[str, Any]], ceiling: float) -> None:
    """Llama-3-8B's linear layers per decode step: 32 x (qkv, o, gate_up, down) + lm_head."""
    for m in sorted({r["m"] for r in rows}):
        per = {r["shape"]: r for r in rows if r["m"] == m and r["shape"].startswith("8b/")}
        if len(per) < 5 or "gemv_us" not in per["8b/o"]:
            continue
        mult = {s: (1 if s.endswith("lm_head") else 32) for s in per}
        ours, theirs = (sum(mult[s] * per[s][key] for s in per) / 1e3 for key in KEYS)
        floor = sum(mult[s] * per[s]["bytes"] for s in per) / ceiling / 1e6
        print(f"8b step, M={m}: linear layers {ours:.3f} ms (gemv) vs {theirs:.3f} ms "
              f"(cuBLAS); at the copy ceiling {floor:.3f} ms")  # fmt: skip


def print_sweep(rows: list[dict[str, Any]], bench: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if "us" in r and r["err"] <= 1]
    table = {(r["shape"], r["m"]): r for r in bench if "gemv_us" in r}
    print("\nsweep: best per point (table's choice for comparison)")
    for key in sorted({(r["shape"], r["m"]) for r in ok}):
        best = min((r for r in ok if (r["shape"], r["m"]) == key), key=lambda r: r["us"])
        t = table.get(key)
        tab = f"table {t['gemv_us']:.1f} us {t['gemv_pct']:.1f}%" if t else ""
        print(f"  {key[0]:<18} M={key[1]}: {best['config']:<28} {best['us']:8.1f} us "
              f"{best['pct']:5.1f}%   {tab}")  # fmt: skip
    print("sweep: per M, the config with the best geomean (fraction of each point's best)")
    for m, (cfg, score) in sorted(best_per_bucket(ok).items()):
        print(f"  M={m}: {cfg}  {score:.3f}")
    for r in rows:
        if "error" in r or r.get("err", 0) > 1:
            print(f"  FAILED {r['shape']} M={r['m']} {r['config']}: {r.get('error', r.get('err'))}")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SHAPE_SETS), help="shape sets: 8b,70b-tp2")
    ap.add_argument("--m", default="1,2,4,8,16", help="rows of x")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="also time the config grid")
    ap.add_argument("--budget-s", type=float, default=150.0, help="sweep time limit")
    ap.add_argument("--out", help="write every record as JSON")
    return ap.parse_args()


def main() -> int:
    args = parse()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    ms = [int(v) for v in args.m.split(",")]
    shapes = [s for name in args.sets.split(",") for s in model_shapes(name)]
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
          f"{triton.__version__}; copy ceiling {ceiling:.0f} GB/s; {args.dtype}; graph replay "
          f"of {CALLS} calls over >= {MIN_WEIGHTS} weights", flush=True)  # fmt: skip
    bench: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    deadline = math.inf
    for shape in shapes:
        p = Point(shape, DTYPES[args.dtype])
        bench += [bench_point(p, m, ceiling, args.samples) for m in ms]
        print_bench(bench[-len(ms) :])
        if args.sweep:
            deadline = min(deadline, time.monotonic() + args.budget_s)
            for m in (m for m in ms if m <= MAX_M):
                sweep += sweep_point(p, m, ceiling, deadline)
        del p
        torch.cuda.empty_cache()
    print("\nall points")
    print_bench(bench)
    print_step_totals(bench, ceiling)
    if args.sweep:
        print_sweep(sweep, bench)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ceiling_gbs": ceiling, "bench": bench, "sweep": sweep}, f, indent=1)
    wrong = [r for r in bench if r.get("err", 0) > 1]
    for r in wrong:
        print(f"WRONG: {r['shape']} M={r['m']} error {r['err']:.2f}x the allowed", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
