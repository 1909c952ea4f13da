"""Derived numbers and the printed report of ``benchmarks/hetero_h100.py``.

For each decode point with host-located chunks, against the all-device point of the
same batch and context:

* ``slowdown`` = ms / ms at 0%; ``extra_ms_per_layer`` = ms − ms at 0%;
* ``llama_step_extra_ms``: the extra of one Llama-3-8B decode step, which reads each of
  its 32 layers once (32 x the extra per layer call);
* ``swap_in_ms``: copying the same tokens back instead, all 32 layers (128 KiB a token),
  once, at the pinned host-to-device rate measured in the same run;
* ``breakeven_steps`` = swap_in_ms / llama_step_extra_ms: a request with fewer decode
  steps left (while its cold chunks stay on the host) costs less left mapped on the
  host than copied back; one with more is cheaper to swap in. (This leaves out what
  the host placement is for, the GPU memory a swap-in needs, and the mapping cost.)
* ``host_gbs_implied``: the host bytes of a call over the time they added, assuming the
  device part still ran at the 0% rate: the interconnect read rate decode achieved.
"""

from __future__ import annotations

from typing import Any

LLAMA_LAYERS = 32
LLAMA_BYTES_PER_TOKEN = LLAMA_LAYERS * 2 * 8 * 128 * 2  # 128 KiB: K and V, bf16
LAYER_BYTES_PER_TOKEN = 2 * 8 * 128 * 2  # one layer's K and V of one token


def derive(rows: list[dict[str, Any]], pinned_gbs: float) -> list[dict[str, Any]]:
    base = {(r["batch"], r["ctx"]): r for r in rows if r["host_chunks"] == 0}
    out = []
    for r in rows:
        b = base.get((r["batch"], r["ctx"]))
        if b is None or r["host_chunks"] == 0:
            continue
        t, t0 = r["ms_per_call"], b["ms_per_call"]
        f = r["host_bytes_per_call"] / r["bytes_per_call"]
        extra = t - t0
        step_extra = LLAMA_LAYERS * extra
        tokens = r["host_bytes_per_call"] // LAYER_BYTES_PER_TOKEN  # batch x host tokens
        swap_in_ms = tokens * LLAMA_BYTES_PER_TOKEN / (pinned_gbs * 1e6)
        host_s = t - t0 * (1 - f)
        out.append(
            {
                "batch": r["batch"],
                "ctx": r["ctx"],
                "host_share": r["host_share"],
                "ms_per_call": t,
                "ms_all_device": t0,
                "gbs": r["gbs"],
                "slowdown": t / t0,
                "extra_ms_per_layer": extra,
                "llama_step_extra_ms": step_extra,
                "host_tokens": tokens,
                "swap_in_ms": swap_in_ms,
                "breakeven_steps": swap_in_ms / step_extra if step_extra > 0 else None,
                "host_gbs_implied": r["host_bytes_per_call"] / (host_s * 1e6)
                if host_s > 0
                else None,
            }
        )
    return out


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _copy_lines(res: dict[str, Any]) -> list[str]:
    lines = ["", "copy bandwidth (GB/s, CUDA events, back-to-back copies)"]
    lines.append(f"{'method':<12} {'dir':<4} {'size':>7} {'GB/s':>8} {'ms/copy':>9}")
    for r in res.get("copy", []):
        size = f"{r['nbytes'] >> 20}MiB"
        lines.append(
            f"{r['method']:<12} {r['direction']:<4} {size:>7} {r['gbs']:8.1f} "
            f"{r['ms_per_copy']:9.4f}"
        )
    return lines


def _decode_lines(
    title: str, rows: list[dict[str, Any]], derived: list[dict[str, Any]]
) -> list[str]:
    lines = ["", title]
    head = (
        f"{'batch':>5} {'ctx':>6} {'host%':>6} {'ms/call':>9} {'GB/s':>8} {'slow':>6} "
        f"{'step+ms':>8} {'swapin':>8} {'b/even':>7} {'hostGB/s':>8}"
    )
    lines.append(head)
    by_key = {(d["batch"], d["ctx"], d["host_share"]): d for d in derived}
    for r in sorted(rows, key=lambda r: (r["ctx"], r["batch"], r["host_share"])):
        d = by_key.get((r["batch"], r["ctx"], r["host_share"]), {})
        lines.append(
            f"{r['batch']:>5} {r['ctx']:>6} {100 * r['host_share']:6.1f} "
            f"{r['ms_per_call']:9.4f} {r['gbs']:8.1f} {_num(d.get('slowdown'), '6.2f')} "
            f"{_num(d.get('llama_step_extra_ms'), '8.2f')} {_num(d.get('swap_in_ms'), '8.2f')} "
            f"{_num(d.get('breakeven_steps'), '7.2f')} {_num(d.get('host_gbs_implied'), '8.1f')}"
        )
    return lines


def report(res: dict[str, Any]) -> str:
    lines = [
        "heterogeneous mapping: host-located KV chunks read by decode over the interconnect",
        f"device: {res.get('device')}",
        f"probe: {res.get('probe')}",
        f"memory: {res.get('memory')}",
    ]
    lines += _copy_lines(res)
    lines += _decode_lines(
        "decode, one layer per call (Llama-3-8B heads 32/8, d=128, bf16), CUDA graph replay;"
        " host% = each request's earliest chunks host-located",
        res.get("decode", []),
        res.get("derived", []),
    )
    lines += _decode_lines(
        "stride check: batch 8 x 4k on a 32-layer arena (Llama-3-8B's 128 KiB rows)",
        res.get("stride_check", []),
        res.get("stride_derived", []),
    )
    lines += [
        "",
        "slow = ms / ms all on device; step+ms = extra ms of a 32-layer decode step;",
        "swapin = ms to copy the same tokens' 32 layers back at the pinned H2D rate, once;",
        "b/even = swapin / step+ms: fewer decode steps left than this, mapping costs less",
        "than swapping in; hostGB/s = host bytes / the time they added.",
        f"errors: {res.get('errors')}",
        f"skipped: {res.get('skipped')}",
        f"elapsed: {res.get('elapsed_s')} s",
    ]
    return "\n".join(lines)
