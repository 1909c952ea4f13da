"""``vtensor bench kernels``: decode and extend attention on the virtual KV layout,
side by side with SGLang's paged (token-pool) Triton kernels and torch FA2 varlen.

All peers run in the same process on the same data. Decode reports achieved
HBM GB/s (K/V bytes read over time) against a read ceiling measured in the
same run; extend reports TFLOP/s (causal FLOPs only). The layout has the real
layer count (32), so one layer's rows are 128 KiB apart, as in serving.

The grid runs on two arenas (``kernel_arenas.py``): a dense ``torch.empty``
buffer with ``max_len = ctx``, then a real VMM ``KVArena`` laid out as the engine
lays out its own, with ``max_len = max_model_len`` as the engine's decode graphs
pass it. SGLang reads a token pool of its own, the same for both arenas, so it
is timed on the dense pass only: twice, with vtensor's split count and with the
split counts of SGLang's own heuristic (``kernel_peers.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import triton

from vtensor.kernels import decode_attention, extend_attention, fa2_decode, fa2_extend

from .baselines import load_sglang
from .ceilings import copy_bandwidth, read_bandwidth
from .kernel_arenas import Arena, DenseArena, HeadConfig, VmmArena
from .kernel_peers import request_rows, sglang_decode_ms, sglang_extend_ms
from .kernel_report import add_rates, print_tables, summaries
from .report import environment, write_json

GiB = 1 << 30
CONFIGS = [HeadConfig("llama3-8b (32/8)", 32, 8), HeadConfig("mha (32/32)", 32, 32)]


def _bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def decode_point(arena: Arena, cfg: HeadConfig, batch: int, ctx: int, sgl: Any) -> dict:
    with arena.point(cfg, batch, ctx) as p:
        if p is None:
            return {"skipped": "arena exceeds the memory budget"}
        dev, dt = p.k.device, p.k.dtype
        q = torch.randn(batch, cfg.q_heads, cfg.head_dim, device=dev, dtype=dt)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        res: dict[str, Any] = {"max_len": p.max_len, **p.evidence}
        res["bytes"] = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * p.k.element_size()
        res["vtensor_ms"] = _bench(lambda: decode_attention(q, p.k, p.v, p.starts, lens, p.max_len))
        res["fa2_ms"] = _bench(lambda: fa2_decode(q, p.k, p.v, p.starts, lens, p.max_len))
        if sgl is not None:
            rows = request_rows(p.starts, ctx)
            for key, own in (("sglang", False), ("sglang_own", True)):
                ms, splits = sglang_decode_ms(sgl, q, (p.k, p.v), rows, ctx, own, _bench)
                res[f"{key}_ms"], res[f"{key}_splits"] = ms, max(splits)
        return res


def extend_point(
    arena: Arena, cfg: HeadConfig, batch: int, prefix: int, new: int, sgl: Any
) -> dict:
    with arena.point(cfg, batch, prefix + new) as p:
        if p is None:
            return {"skipped": "arena exceeds the memory budget"}
        total = batch * new
        dev, dt = p.k.device, p.k.dtype
        q = torch.randn(total, cfg.q_heads, cfg.head_dim, device=dev, dtype=dt)
        indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * new
        prefixes = torch.full((batch,), prefix, device=dev, dtype=torch.int32)
        flops = 4 * cfg.q_heads * cfg.head_dim * batch * (new * prefix + new * (new + 1) / 2)
        res: dict[str, Any] = {"flops": flops, **p.evidence}
        args = (q, p.k, p.v, indptr, p.starts, prefixes)
        # The engine passes the batch's longest new span as max_new, on either arena.
        res["vtensor_ms"] = _bench(lambda: extend_attention(*args, new))
        res["fa2_ms"] = _bench(lambda: fa2_extend(*args, new, prefix + new))
        if sgl is not None:
            rows = request_rows(p.starts, prefix + new)
            res["sglang_ms"] = sglang_extend_ms(sgl, q, (p.k, p.v), rows, prefix, _bench)
        return res


def run_decode(
    arena: Arena, sgl: Any, batches: list[int], ctxs: list[int], read_gbs: float
) -> list[dict]:
    rows = []
    for cfg, batch, ctx in itertools.product(CONFIGS, batches, ctxs):
        r: dict[str, Any] = {"config": cfg.name, "batch": batch, "ctx": ctx, "arena": arena.name}
        r.update(decode_point(arena, cfg, batch, ctx, sgl))
        if "vtensor_ms" in r:
            add_rates(r, "bytes", "gbs", 1e6)
            r["vtensor_pct_of_read_ceiling"] = 100 * r["vtensor_gbs"] / read_gbs
        rows.append(r)
        print(
            f"  decode [{arena.name}] {cfg.name} b={batch} ctx={ctx}: "
            f"{r.get('vtensor_gbs', 0):.0f} GB/s {r.get('skipped', '')}",
            flush=True,
        )
        _empty_cache()
    return rows


def run_extend(
    arena: Arena, sgl: Any, batch: int, prefixes: list[int], news: list[int]
) -> list[dict]:
    rows = []
    for cfg, prefix, new in itertools.product(CONFIGS[:1], prefixes, news):
        r: dict[str, Any] = {"config": cfg.name, "batch": batch, "prefix": prefix, "new": new}
        r.update({"arena": arena.name, **extend_point(arena, cfg, batch, prefix, new, sgl)})
        if "vtensor_ms" in r:
            add_rates(r, "flops", "tflops", 1e9)
        rows.append(r)
        print(
            f"  extend [{arena.name}] p={prefix} n={new}: "
            f"{r.get('vtensor_tflops', 0):.0f} TFLOP/s {r.get('skipped', '')}",
            flush=True,
        )
        _empty_cache()
    return rows


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_arena(arena: Arena, sgl: Any, args: Any, res: dict[str, Any]) -> None:
    """The decode and extend grids on one arena (SGLang only where ``sgl`` is given)."""
    try:
        res["decode"] += run_decode(
            arena, sgl[0] if sgl else None, args.batches, args.ctxs, res["read_gbs"]
        )
        res["extend"] += run_extend(
            arena, sgl[1] if sgl else None, args.extend_batch, args.prefixes, args.news
        )
    finally:
        arena.close()


def main(args: Any) -> int:
    if not torch.cuda.is_available():
        print(
            "error: vtensor bench kernels needs a CUDA GPU (the CPU tests cover "
            "correctness under TRITON_INTERPRET=1)"
        )
        return 2
    sgl = load_sglang()
    res: dict[str, Any] = {"env": environment(), "sglang": sgl is not None, "decode": []}
    res["extend"], res["max_model_len"] = [], args.max_model_len
    print("measuring ceilings...", flush=True)
    res["read_gbs"], res["copy_gbs"] = read_bandwidth(), copy_bandwidth()
    budget, device = int(args.budget_gib * GiB), torch.device("cuda")
    if "dense" in args.arenas:
        run_arena(DenseArena(budget, device, torch.bfloat16), sgl, args, res)
    if "vmm" in args.arenas:
        vmm = VmmArena(budget, device, torch.bfloat16, args.max_model_len)
        run_arena(vmm, None if "dense" in args.arenas else sgl, args, res)
    summaries(res)
    print_tables(res)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0
