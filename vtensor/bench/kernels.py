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

Decode is timed twice (``kernel_timing.py``): replaying a CUDA graph of one call
per layer over several layers, as the engine runs it, and eagerly per call. Ours
runs with one reused split-K ``DecodeWorkspace``, as the engine's backend does;
every peer's first call is checked against FA2's output on the same K/V. With
``--decode-configs``, launch candidates are swept under graph replay at every
point (``kernel_candidates.py``); the goals are judged on the graph figures
(``kernel_graph_report.py``).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from vtensor.kernels import (
    DecodeWorkspace,
    decode_attention,
    extend_attention,
    fa2_decode,
    fa2_extend,
)
from vtensor.kernels.decode_config import DecodeConfig
from vtensor.kernels.reference import decode_ref
from vtensor.kernels.splitk import BALANCE_WAVES, MAX_WAVES, num_sms, used_splits

from .baselines import load_sglang
from .ceilings import copy_bandwidth, read_bandwidth
from .kernel_arenas import Arena, DenseArena, HeadConfig, KVPoint, VmmArena
from .kernel_candidates import DecodeCandidate
from .kernel_graph_report import add_graph_rates
from .kernel_grid import KernelGrid, grid_from_args
from .kernel_peers import request_rows, sglang_decode_calls, sglang_extend_ms, sglang_pools
from .kernel_report import add_rates, print_tables, summaries
from .kernel_timing import Call, rotation, time_peer
from .report import environment, write_json

GiB = 1 << 30
FA2_CHECK_BATCH = 8  # FA2 itself is checked against the fp32 reference up to this batch


def _bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def decode_point(
    arena: Arena,
    cfg: HeadConfig,
    batch: int,
    ctx: int,
    sgl: Any,
    cands: list[DecodeCandidate] | None = None,
) -> dict:
    call_bytes = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * arena.dtype.itemsize
    rot = rotation(call_bytes, cfg.layers)  # graph replays rotate over this many layers
    with arena.point(cfg, batch, ctx, rot) as p:
        if p is None:
            return {"skipped": "arena exceeds the memory budget"}
        dev, dt = p.k.device, p.k.dtype
        q = torch.randn(batch, cfg.q_heads, cfg.head_dim, device=dev, dtype=dt)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        res: dict[str, Any] = {"max_len": p.max_len, **p.evidence, "rotate": rot}
        res["bytes"] = call_bytes
        ref = _time_fa2(res, q, p, lens)
        _time_ours(res, cfg, q, p, lens, ref, cands or [])
        if sgl is not None:
            _time_sglang(res, sgl, q, p, ctx, ref)
        return res


def _time_fa2(
    res: dict[str, Any], q: torch.Tensor, p: KVPoint, lens: torch.Tensor
) -> torch.Tensor | None:
    """Time FA2 (the reference of the others); returns its layer-0 output in fp32, None
    where FA2 failed. At small batches FA2 is itself checked against fp32 torch."""
    calls = [functools.partial(fa2_decode, q, k, v, p.starts, lens, p.max_len) for k, v in p.layers]
    exact = None
    if q.shape[0] <= FA2_CHECK_BATCH:
        exact = decode_ref(q, p.k, p.v, p.starts, lens, q.shape[-1] ** -0.5)
    time_peer(res, "fa2", calls, exact)
    if "fa2_error" in res:
        return None
    out = calls[0]()
    return out.float() if isinstance(out, torch.Tensor) else None


def _time_ours(
    res: dict[str, Any],
    cfg: HeadConfig,
    q: torch.Tensor,
    p: KVPoint,
    lens: torch.Tensor,
    ref: torch.Tensor | None,
    cands: list[DecodeCandidate],
) -> None:
    """Our decode, default launch, then each candidate (graph only), one call per layer,
    all with one reused workspace (sized for the most waves any of them aims at)."""
    batch, sms = q.shape[0], num_sms(q.device)
    waves = max([MAX_WAVES, *(c.waves for c in cands)])
    ws = DecodeWorkspace(cfg.q_heads, cfg.head_dim, batch + waves * sms, q.device)

    def ours(**kw: Any) -> list[Call]:
        return [
            functools.partial(decode_attention, q, k, v, p.starts, lens, p.max_len,
                              workspace=ws, **kw)
            for k, v in p.layers
        ]  # fmt: skip

    time_peer(res, "vtensor", ours(), ref)
    auto = DecodeCandidate().num_splits(batch, cfg.kv_heads, p.max_len, sms)
    res["vtensor_grid_splits"] = _grid_splits(auto, p.max_len, DecodeConfig())
    # What each (equal-length) request uses after the device balance: SGLang gets it.
    ctx = int(lens[0])  # every request has the point's context
    res["vtensor_splits"] = used_splits(
        ctx, batch * ctx, res["vtensor_grid_splits"], DecodeConfig().min_split,
        BALANCE_WAVES * sms, cfg.kv_heads, DecodeConfig().block_n,
    )  # fmt: skip
    for cand in cands:
        splits = cand.num_splits(batch, cfg.kv_heads, p.max_len, sms)
        one: dict[str, Any] = {"splits": _grid_splits(splits, p.max_len, cand.config)}
        time_peer(one, "c", ours(config=cand.config, num_splits=splits), ref, eager=False)
        res.setdefault("candidates", {})[cand.name] = {
            k.removeprefix("c_"): v for k, v in one.items()
        }


def _grid_splits(splits: int, max_len: int, config: DecodeConfig) -> int:
    """The grid's split count as decode_attention clamps it."""
    return max(1, min(splits, triton.cdiv(max_len, config.min_split)))


def _time_sglang(
    res: dict[str, Any],
    sgl: Any,
    q: torch.Tensor,
    p: KVPoint,
    ctx: int,
    ref: torch.Tensor | None,
) -> None:
    """SGLang with our split count and with its own heuristic's, over one token pool per
    rotated layer (copies: at most about 256 MiB plus one layer's K/V), shared by both."""
    pools = sglang_pools(p.layers, request_rows(p.starts, ctx))
    res["sglang_pool_bytes"] = sum(k.nbytes + v.nbytes for k, v in pools)
    for key, own in (("sglang", False), ("sglang_own", True)):
        calls, splits = sglang_decode_calls(sgl, q, pools, ctx, own)
        time_peer(res, key, calls, ref)
        res[f"{key}_splits"] = max(splits)


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


def run_decode(arena: Arena, sgl: Any, grid: KernelGrid, read_gbs: float) -> list[dict]:
    rows = []
    for cfg, batch, ctx in itertools.product(grid.heads, grid.batches, grid.ctxs):
        r: dict[str, Any] = {"config": cfg.name, "batch": batch, "ctx": ctx, "arena": arena.name}
        r.update(decode_point(arena, cfg, batch, ctx, sgl, list(grid.candidates)))
        if "vtensor_ms" in r:
            add_rates(r, "bytes", "gbs", 1e6)
            r["vtensor_pct_of_read_ceiling"] = 100 * r["vtensor_gbs"] / read_gbs
        if "bytes" in r:
            add_graph_rates(r, read_gbs)
        rows.append(r)
        print(
            f"  decode [{arena.name}] {cfg.name} b={batch} ctx={ctx}: graph "
            f"{r.get('vtensor_graph_gbs', 0):.0f} GB/s, eager {r.get('vtensor_gbs', 0):.0f} "
            f"GB/s {r.get('skipped', '')}",
            flush=True,
        )
        _empty_cache()
    return rows


def run_extend(
    arena: Arena,
    sgl: Any,
    heads: Sequence[HeadConfig],
    batch: int,
    prefixes: Sequence[int],
    news: Sequence[int],
) -> list[dict]:
    rows = []
    for cfg, prefix, new in itertools.product(heads, prefixes, news):
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


def run_arena(arena: Arena, sgl: Any, grid: KernelGrid, res: dict[str, Any]) -> None:
    """The decode and extend grids on one arena (SGLang only where ``sgl`` is given)."""
    started = time.perf_counter()
    try:
        res["decode"] += run_decode(arena, sgl[0] if sgl else None, grid, res["read_gbs"])
        if grid.extend:  # GQA only, as the committed tables
            res["extend"] += run_extend(
                arena, sgl[1] if sgl else None, grid.heads[:1], grid.extend_batch,
                grid.prefixes, grid.news,
            )  # fmt: skip
    finally:
        arena.close()
        res.setdefault("elapsed_s", {})[arena.name] = round(time.perf_counter() - started, 1)


def main(args: Any) -> int:
    grid = grid_from_args(args)  # bad options fail before any GPU work
    if not torch.cuda.is_available():
        print(
            "error: vtensor bench kernels needs a CUDA GPU (the CPU tests cover "
            "correctness under TRITON_INTERPRET=1)"
        )
        return 2
    started = time.perf_counter()
    sgl = load_sglang()
    res: dict[str, Any] = {"env": environment(), "sglang": sgl is not None, "decode": []}
    res["extend"], res["max_model_len"] = [], args.max_model_len
    res["decode_candidates"] = [c.name for c in grid.candidates]
    print("measuring ceilings...", flush=True)
    res["read_gbs"], res["copy_gbs"] = read_bandwidth(), copy_bandwidth()
    budget, device = int(args.budget_gib * GiB), torch.device("cuda")
    if "dense" in args.arenas:
        run_arena(DenseArena(budget, device, torch.bfloat16), sgl, grid, res)
    if "vmm" in args.arenas:
        vmm = VmmArena(budget, device, torch.bfloat16, args.max_model_len)
        run_arena(vmm, None if "dense" in args.arenas else sgl, grid, res)
    res["elapsed_s"]["total"] = round(time.perf_counter() - started, 1)
    summaries(res)
    if args.json:  # before printing: a report bug must not lose a GPU run's figures
        write_json(args.json, res)
    print_tables(res)
    print(f"elapsed: {res['elapsed_s']} s")
    if args.json:
        print(f"wrote {args.json}")
    return 0
