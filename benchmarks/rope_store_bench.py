"""Rotary + K/V store per layer (issue 11): today's compiled ``rotate`` then ``store_kv``
against the fused ``rope_store_kv``, CUDA-graph replay, Llama-3-8B heads (32 q, 8 kv,
d=128, bf16), one call per layer view of 32 as in a decode step.

Prints us per layer for each batch, and the fused kernel's bytes moved per second
(qkv read once; q, k and v written once). Checks both paths' outputs agree first.
Needs a GPU; a few seconds per batch on an H100.

python3 benchmarks/rope_store_bench.py 1 16 64 256
"""

from __future__ import annotations

import sys

import torch

from vtensor.bench.kernel_timing import graph_ms, rel_err
from vtensor.kernels import rope_store_kv, store_kv
from vtensor.kvcache import KVLayout
from vtensor.models.fused import rotate

HQ, HKV, D, LAYERS, DTYPE = 32, 8, 128, 32, torch.bfloat16


def point(batch: int) -> dict[str, float]:
    lay = KVLayout(batch + 1, 64, LAYERS, HKV, D, DTYPE)
    arena = torch.zeros(lay.shape, dtype=DTYPE, device="cuda")
    views = [(lay.k_view(arena, i), lay.v_view(arena, i)) for i in range(LAYERS)]
    qkvs = [torch.randn(batch, (HQ + 2 * HKV) * D, device="cuda", dtype=DTYPE) for _ in views]
    angle = torch.rand(batch, 1, D // 2, device="cuda") * 1000
    cos, sin = angle.cos(), angle.sin()
    pos = torch.randint(0, 64, (batch,), device="cuda", dtype=torch.int32)
    rows = torch.arange(1, batch + 1, device="cuda", dtype=torch.int32) * 64 + pos
    split = (HQ + HKV) * D

    def today(i: int) -> torch.Tensor:
        qkv = qkvs[i]
        qk = rotate(qkv[:, :split].unflatten(-1, (HQ + HKV, D)), cos, sin)
        v = qkv[:, split:].unflatten(-1, (HKV, D))
        store_kv(*views[i], qk[:, HQ:], v, rows)
        return qk[:, :HQ]

    def fused(i: int) -> torch.Tensor:
        return rope_store_kv(qkvs[i], cos, sin, *views[i], rows, HQ)

    ref_q = today(0).float()
    ref_k = views[0][0][rows.long()].float()
    err = max(rel_err(fused(0), ref_q), rel_err(views[0][0][rows.long()], ref_k))
    res = {"err": err}
    for name, fn in (("today", today), ("fused", fused)):
        res[name] = 1e3 * graph_ms([lambda i=i, fn=fn: fn(i) for i in range(LAYERS)])
    moved = batch * (HQ + 2 * HKV) * D * 2 * DTYPE.itemsize  # read qkv, write q/k/v
    res["fused_gbs"] = moved / (res["fused"] * 1e-6) / 1e9
    return res


def main(batches: list[int]) -> None:
    print(f"{'batch':>6} {'today us':>9} {'fused us':>9} {'speedup':>8} {'GB/s':>7} {'err':>8}")
    for b in batches:
        r = point(b)
        print(f"{b:>6} {r['today']:>9.2f} {r['fused']:>9.2f} {r['today'] / r['fused']:>7.1f}x "
              f"{r['fused_gbs']:>7.0f} {r['err']:>8.1e}", flush=True)  # fmt: skip
        assert r["err"] < 1e-2, f"fused and today's path disagree at batch {b}: {r['err']}"


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 16, 64, 256])
