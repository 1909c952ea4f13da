"""Decode tuning sweep (GPU): launch configs and split counts, timed through CUDA
graphs (no CPU launch overhead) and plainly, against SGLang's decode kernel.

    PYTHONPATH=.sgl:. python3 benchmarks/decode_sweep.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from vtensor.bench.baselines import load_sglang
from vtensor.bench.kernel_arenas import DenseArena, HeadConfig
from vtensor.bench.kernel_peers import request_rows, sglang_decode_ms
from vtensor.kernels import decode_attention
from vtensor.kernels.decode import DecodeConfig, choose_num_splits, num_sms

POINTS = [(1, 32768), (8, 4096), (32, 4096), (128, 4096), (32, 8192)]


def graphed_ms(fn) -> float:  # type: ignore[no-untyped-def]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = HeadConfig("llama3-8b (32/8)", 32, 8)
    arena = DenseArena(64 << 30, torch.device("cuda"), torch.bfloat16)
    sgl = load_sglang()
    rows = []
    for batch, ctx in POINTS:
        with arena.point(cfg, batch, ctx) as p:
            rows.append(sweep_point(p.k, p.v, p.starts, batch, ctx, sgl))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def sweep_point(k, v, starts, batch: int, ctx: int, sgl) -> dict:  # type: ignore[no-untyped-def]
    """Plain and graphed decode at the default config, then the best of a tuning grid."""
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    gb = 2 * batch * ctx * 8 * 128 * 2 / 1e9
    auto = choose_num_splits(batch, 8, ctx, num_sms(q.device))
    row = {"batch": batch, "ctx": ctx, "auto_splits": auto}
    row["default_plain_gbs"] = (
        gb
        / triton.testing.do_bench(
            lambda: decode_attention(q, k, v, starts, lens, ctx), return_mode="median"
        )
        * 1e3
    )
    row["default_graph_gbs"] = (
        gb / graphed_ms(lambda: decode_attention(q, k, v, starts, lens, ctx)) * 1e3
    )
    if sgl:
        ms, _ = sglang_decode_ms(
            sgl[0], q, (k, v), request_rows(starts, ctx), ctx, False, triton.testing.do_bench
        )
        row["sglang_plain_gbs"] = gb / ms * 1e3
    best = (0.0, None)
    for bn, w, st, sf in itertools.product([32, 64, 128], [2, 4, 8], [2, 3, 4], [0.5, 1, 2]):
        c = DecodeConfig(bn, w, st)
        ns = max(1, int(auto * sf))
        try:
            ms = graphed_ms(
                lambda c=c, ns=ns: decode_attention(
                    q, k, v, starts, lens, ctx, num_splits=ns, config=c
                )
            )
        except Exception as exc:  # out of shared memory etc.
            print("  skip", bn, w, st, sf, type(exc).__name__)
            continue
        if gb / ms * 1e3 > best[0]:
            best = (gb / ms * 1e3, {"block_n": bn, "warps": w, "stages": st, "splits": ns})
    row["best_graph_gbs"], row["best_config"] = best
    return row


if __name__ == "__main__":
    main()
