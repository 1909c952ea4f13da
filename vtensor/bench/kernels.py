"""``vtensor bench kernels``: decode and extend attention on the virtual KV layout,
side by side with SGLang's paged (token-pool) Triton kernels and torch FA2 varlen.

All peers run in the same process on the same data. Decode reports achieved
HBM GB/s (K/V bytes read over time) against a read ceiling measured in the
same run; extend reports TFLOP/s (causal FLOPs only). The arena uses the real
layer count (32), so one layer's rows are 128 KiB apart, as in serving.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import triton

from vtensor.kernels import decode_attention, extend_attention, fa2_decode, fa2_extend
from vtensor.kernels.decode import choose_num_splits, num_sms
from vtensor.kvcache import KVLayout

from .baselines import load_sglang
from .ceilings import copy_bandwidth, read_bandwidth
from .report import environment, format_table, write_json

GiB = 1 << 30


@dataclass(frozen=True)
class HeadConfig:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int = 128
    layers: int = 32


CONFIGS = [HeadConfig("llama3-8b (32/8)", 32, 8), HeadConfig("mha (32/32)", 32, 32)]


def _bench(fn: Any) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


class Arena:
    """One big buffer reused for every grid point (its prefix viewed with a layout)."""

    def __init__(self, budget_bytes: int) -> None:
        self.buf = torch.empty(budget_bytes // 2, dtype=torch.bfloat16, device="cuda")

    def layout(self, cfg: HeadConfig, slots: int, max_tokens: int) -> KVLayout | None:
        lay = KVLayout(slots, max_tokens, cfg.layers, cfg.kv_heads, cfg.head_dim)
        return lay if lay.total_bytes <= self.buf.numel() * 2 else None

    def views(self, lay: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
        arena = self.buf[: lay.total_bytes // 2].view(lay.shape)
        k, v = lay.k_view(arena, 0), lay.v_view(arena, 0)
        for t in (k, v):  # fill only what is read: the benchmarked layer
            for s in range(0, t.shape[0], 1 << 16):
                t[s : s + (1 << 16)].normal_()
        return k, v


def decode_point(arena: Arena, cfg: HeadConfig, batch: int, ctx: int, sgl: Any) -> dict:
    lay = arena.layout(cfg, batch, ctx)
    if lay is None:
        return {"skipped": "arena exceeds the memory budget"}
    k, v = arena.views(lay)
    q = torch.randn(batch, cfg.q_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    starts = torch.arange(batch, device="cuda", dtype=torch.int32) * ctx
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    kv_bytes = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * 2
    res: dict[str, float] = {"bytes": kv_bytes}
    res["vtensor_ms"] = _bench(lambda: decode_attention(q, k, v, starts, lens, ctx))
    res["fa2_ms"] = _bench(lambda: fa2_decode(q, k, v, starts, lens, ctx))
    if sgl is not None:
        res["sglang_ms"] = _sglang_decode(sgl, q, k, v, batch, ctx, cfg)
    return res


def _sglang_decode(
    sgl: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: int,
    ctx: int,
    cfg: HeadConfig,
) -> float:
    """SGLang's decode on a token pool holding the same K/V, page size 1."""
    rows = torch.cat([torch.arange(ctx, device="cuda") + b * ctx for b in range(batch)])
    k_pool, v_pool = k[rows].contiguous(), v[rows].contiguous()
    indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * ctx
    indices = torch.arange(batch * ctx, device="cuda", dtype=torch.int64)
    splits = choose_num_splits(batch, cfg.kv_heads, ctx, num_sms(q.device))
    o = torch.empty_like(q)
    logits = torch.empty(batch, cfg.q_heads, splits, cfg.head_dim, device="cuda")
    lse = torch.empty(batch, cfg.q_heads, splits, device="cuda")
    nsplit = torch.full((batch,), splits, device="cuda", dtype=torch.int32)
    fn = sgl.decode_attention_fwd
    ms = _bench(
        lambda: fn(
            q, k_pool, v_pool, o, indptr, indices, logits, lse, nsplit, splits, cfg.head_dim**-0.5
        )
    )
    return ms


def extend_point(
    arena: Arena, cfg: HeadConfig, batch: int, prefix: int, new: int, sgl: Any
) -> dict:
    lay = arena.layout(cfg, batch, prefix + new)
    if lay is None:
        return {"skipped": "arena exceeds the memory budget"}
    k, v = arena.views(lay)
    total = batch * new
    q = torch.randn(total, cfg.q_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new
    starts = torch.arange(batch, device="cuda", dtype=torch.int32) * (prefix + new)
    prefixes = torch.full((batch,), prefix, device="cuda", dtype=torch.int32)
    flops = 4 * cfg.q_heads * cfg.head_dim * batch * (new * prefix + new * (new + 1) / 2)
    res: dict[str, Any] = {"flops": flops}
    args = (q, k, v, indptr, starts, prefixes)
    res["vtensor_ms"] = _bench(lambda: extend_attention(*args, new))
    res["fa2_ms"] = _bench(lambda: fa2_extend(*args, new, prefix + new))
    if sgl is not None:
        res["sglang_ms"] = _sglang_extend(sgl, q, k, v, batch, prefix, new, cfg)
    return res


def _sglang_extend(
    sgl: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: int,
    prefix: int,
    new: int,
    cfg: HeadConfig,
) -> float:
    """SGLang's extend: prefix K/V in a token pool (indexed), new K/V contiguous."""
    seq = prefix + new
    pre = torch.cat([torch.arange(prefix, device="cuda") + b * seq for b in range(batch)])
    ext = torch.cat([torch.arange(prefix, seq, device="cuda") + b * seq for b in range(batch)])
    k_pool, v_pool = k[pre].contiguous(), v[pre].contiguous()
    k_ext, v_ext = k[ext].contiguous(), v[ext].contiguous()
    if prefix == 0:  # an empty pool still needs a valid pointer
        k_pool = v_pool = torch.zeros(
            1, cfg.kv_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16
        )
    qo = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new
    kv_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * prefix
    kv_indices = torch.arange(max(1, batch * prefix), device="cuda", dtype=torch.int64)
    o = torch.empty_like(q)
    fn = sgl.extend_attention_fwd
    return _bench(
        lambda: fn(
            q, k_ext, v_ext, o, k_pool, v_pool, qo, kv_indptr, kv_indices, None, True, None, new
        )
    )


PEERS = ("vtensor", "fa2", "sglang")


def _add_rates(r: dict, work: str, unit: str, per_ms: float) -> None:
    """``r[peer_unit] = r[work] / r[peer_ms] / per_ms`` for each measured peer, and
    our speedup over SGLang when it ran."""
    for peer in PEERS:
        if f"{peer}_ms" in r:
            r[f"{peer}_{unit}"] = r[work] / r[f"{peer}_ms"] / per_ms
    if "sglang_ms" in r:
        r["speedup_vs_sglang"] = r["sglang_ms"] / r["vtensor_ms"]


def run_decode(
    arena: Arena, sgl: Any, batches: list[int], ctxs: list[int], read_gbs: float
) -> list[dict]:
    rows = []
    for cfg, batch, ctx in itertools.product(CONFIGS, batches, ctxs):
        r = {
            "config": cfg.name,
            "batch": batch,
            "ctx": ctx,
            **decode_point(arena, cfg, batch, ctx, sgl),
        }
        if "vtensor_ms" in r:
            _add_rates(r, "bytes", "gbs", 1e6)
            r["vtensor_pct_of_read_ceiling"] = 100 * r["vtensor_gbs"] / read_gbs
        rows.append(r)
        print(
            f"  decode {cfg.name} b={batch} ctx={ctx}: "
            f"{r.get('vtensor_gbs', 0):.0f} GB/s {r.get('skipped', '')}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def run_extend(
    arena: Arena, sgl: Any, batch: int, prefixes: list[int], news: list[int]
) -> list[dict]:
    rows = []
    for cfg, prefix, new in itertools.product(CONFIGS[:1], prefixes, news):
        r = {
            "config": cfg.name,
            "batch": batch,
            "prefix": prefix,
            "new": new,
            **extend_point(arena, cfg, batch, prefix, new, sgl),
        }
        if "vtensor_ms" in r:
            _add_rates(r, "flops", "tflops", 1e9)
            r["speedup_vs_fa2"] = r["fa2_ms"] / r["vtensor_ms"]
        rows.append(r)
        print(f"  extend p={prefix} n={new}: {r.get('vtensor_tflops', 0):.0f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    return rows


def _print_tables(res: dict) -> None:
    print(
        f"\nceilings: read {res['read_gbs']:.0f} GB/s, copy {res['copy_gbs']:.0f} GB/s "
        f"(R+W); SGLang {'loaded' if res['sglang'] else 'NOT available'}"
    )
    dec = [r for r in res["decode"] if "vtensor_ms" in r]
    print("\nDecode (GB/s of K/V read; % of measured read ceiling)")
    print(
        format_table(
            ["config", "batch", "ctx", "vtensor", "%ceil", "sglang", "fa2", "x sglang"],
            [
                (
                    r["config"],
                    r["batch"],
                    r["ctx"],
                    r["vtensor_gbs"],
                    r["vtensor_pct_of_read_ceiling"],
                    r.get("sglang_gbs", float("nan")),
                    r["fa2_gbs"],
                    r.get("speedup_vs_sglang", float("nan")),
                )
                for r in dec
            ],
        )
    )
    skipped = [f"{r['config']} {r['batch']}x{r['ctx']}" for r in res["decode"] if "skipped" in r]
    if skipped:
        print("skipped (arena over budget): " + ", ".join(skipped))
    ext = [r for r in res["extend"] if "vtensor_ms" in r]
    print(f"\nExtend (TFLOP/s, batch {ext[0]['batch'] if ext else '-'})")
    print(
        format_table(
            ["prefix", "new", "vtensor", "sglang", "fa2", "x sglang", "x fa2"],
            [
                (
                    r["prefix"],
                    r["new"],
                    r["vtensor_tflops"],
                    r.get("sglang_tflops", float("nan")),
                    r["fa2_tflops"],
                    r.get("speedup_vs_sglang", float("nan")),
                    r["speedup_vs_fa2"],
                )
                for r in ext
            ],
        )
    )
    for key, label in (("decode_summary", "decode"), ("extend_summary", "extend")):
        print(f"{label} summary: {res[key]}")


def _summaries(res: dict) -> None:
    big = [r for r in res["decode"] if "vtensor_ms" in r and r["batch"] * r["ctx"] >= 32 * 4096]
    res["decode_summary"] = {
        "points_batch_x_ctx_ge_32x4k": len(big),
        "min_pct_of_read_ceiling": min(
            (r["vtensor_pct_of_read_ceiling"] for r in big), default=None
        ),
        "min_speedup_vs_sglang": min(
            (r["speedup_vs_sglang"] for r in big if "speedup_vs_sglang" in r), default=None
        ),
    }
    ext = [r for r in res["extend"] if "speedup_vs_sglang" in r]
    res["extend_summary"] = {
        "mean_speedup_vs_sglang": sum(r["speedup_vs_sglang"] for r in ext) / len(ext)
        if ext
        else None,
        "min_speedup_vs_fa2_long_prefix": min(
            (
                r["speedup_vs_fa2"]
                for r in res["extend"]
                if r.get("prefix", 0) >= 4096 and "speedup_vs_fa2" in r
            ),
            default=None,
        ),
    }


def main(args: Any) -> int:
    if not torch.cuda.is_available():
        print(
            "error: vtensor bench kernels needs a CUDA GPU (the CPU tests cover "
            "correctness under TRITON_INTERPRET=1)"
        )
        return 2
    sgl = load_sglang()
    res: dict[str, Any] = {"env": environment(), "sglang": sgl is not None}
    print("measuring ceilings...", flush=True)
    res["read_gbs"], res["copy_gbs"] = read_bandwidth(), copy_bandwidth()
    arena = Arena(int(args.budget_gib * GiB))
    res["decode"] = run_decode(
        arena, sgl[0] if sgl else None, args.batches, args.ctxs, res["read_gbs"]
    )
    res["extend"] = run_extend(
        arena, sgl[1] if sgl else None, args.extend_batch, args.prefixes, args.news
    )
    _summaries(res)
    _print_tables(res)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0
