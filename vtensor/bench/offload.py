"""``vtensor bench offload``: decode and prefill with weights offloaded under a budget,
against the floor and the naive peer, all measured in one run.

* Budgets (``--budgets``, percent of the weights): each is that share of the weight
  bytes plus a ring allowance (``depth`` slots of a whole layer) and the step's
  workspace; 100% offloads nothing and gives the compute floor. Random weights of
  ``--shape`` (default Llama-3-8B) are built on the device, except the offloaded
  ones, which are drawn on the device a tensor at a time and land in pinned memory.
* ``--big``: a Llama-3-70B-shape model larger than the GPU, at ``--budget-gib``
  (default: the GPU's memory less the KV cache and 10 GiB); no 100% run, so the
  compute floor is estimated (``offload_report.py``). Its weights never exist whole
  on the GPU.
* For each budget: decode steps at ``--batches`` (``graphs``, ``eager``, ``naive``,
  ``naive-pinned``: ``offload_measure.py``) and a ``--prefill-tokens`` prefill; the
  weight bytes the GPU holds; the placement.

``--quick`` shrinks everything (tests, smoke runs).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.offload_setup import ring_backend, step_workspace_bytes
from vtensor.engine.setup import model_config, runtime_for
from vtensor.models.loader import meta_model
from vtensor.models.offload.hooks import LayerHooks
from vtensor.models.offload.inventory import inventory
from vtensor.models.offload.policy import BudgetTooSmallError

from . import offload_measure as measure
from .offload_report import MODES, add_floors, goals, print_report
from .report import environment, write_json

# The grid's defaults, and --quick's; an option given on the command line wins over both.
FULL = dict(batches=[1, 16, 64], budgets=[100, 75, 50, 25], decode_steps=4, decode_ctx=128,
            prefill_tokens=2048, reps=2, prefill_stream=6)  # fmt: skip
QUICK = dict(batches=[1, 4], budgets=[100, 50], decode_steps=3, decode_ctx=32,
             prefill_tokens=128, reps=1, prefill_stream=3)  # fmt: skip


def main(args: Any) -> int:
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.modes is None:  # --big: a pageable copy of ~80 GB of weights fits no host
        args.modes = [m for m in MODES if not (args.big and m == "naive")]
    base = base_config(args)
    device = runtime_for(base, *model_config(base)).device
    print(f"vtensor bench offload: {base.model or base.shape or 'embedded'} on {device}",
          flush=True)  # fmt: skip
    bw = bandwidths(device, args)
    print(f"  pinned H2D {bw['h2d_pinned_gbs']:.1f} GB/s, pageable {bw['h2d_pageable_gbs']:.1f}",
          flush=True)  # fmt: skip
    runs = budgets(base, args)
    rows = [run_budget(replace(base, gpu_memory_budget=b), label, args) for label, b in runs]
    add_floors(rows, bw, args.prefill_tokens)
    verdicts = goals(rows)
    print_report(rows, bw, verdicts)
    if args.json:
        config = {k: str(v) for k, v in vars(args).items() if k not in ("func",)}
        write_json(args.json, {"args": config, "bandwidth": bw, "budgets": rows,
                               "goals": verdicts, "env": environment()})  # fmt: skip
        print(f"wrote {args.json}")
    return 0


def base_config(args: Any) -> EngineConfig:
    shape = "llama3-70b" if args.big else args.shape
    shape = None if args.model is not None or shape == "embedded" else shape
    max_len = max(args.prefill_tokens, args.decode_ctx + 2 * args.decode_steps + 128) + 64
    return EngineConfig(
        model=args.model, shape=shape, device=args.device, dtype=args.dtype,
        max_model_len=max_len, max_num_seqs=max(args.batches),
        max_num_batched_tokens=max(args.prefill_tokens, 256), kv_cache_bytes=kv_bytes(args),
        offload_ring_depth=args.ring_depth, seed=0,
    )  # fmt: skip


def kv_bytes(args: Any) -> int | None:
    if args.kv_cache_gib is not None:
        return int(args.kv_cache_gib * 2**30)
    if args.device == "cpu" or (args.device is None and not torch.cuda.is_available()):
        return None  # the CPU engine's default pool
    return 10 << 30 if args.big else 6 << 30


def budgets(base: EngineConfig, args: Any) -> list[tuple[str, int]]:
    """``(label, gpu_memory_budget)`` of each run, the 100% (compute floor) run first."""
    cfg, name = model_config(base)
    rt = runtime_for(base, cfg, name)
    layers, fixed = inventory(meta_model(cfg, rt.dtype, rt.max_model_len), cfg.num_layers)
    weights = fixed + sum(sum(w.groups.values()) for w in layers)
    backend = ring_backend(rt.device)
    chunk = backend.chunk_size
    backend.close()
    largest = max(sum(w.groups.values()) for w in layers)
    extra = base.offload_ring_depth * -(-largest // chunk) * chunk
    extra += step_workspace_bytes(base, cfg, rt.dtype.itemsize)
    if args.big:
        total = torch.cuda.get_device_properties(rt.device).total_memory
        gib = args.budget_gib or (total - (base.kv_cache_bytes or 0) - (10 << 30)) / 2**30
        print(f"  model weights {weights / 2**30:.1f} GiB vs GPU {total / 2**30:.1f} GiB; "
              f"budget {gib:.1f} GiB", flush=True)  # fmt: skip
        return [(f"budget {gib:.1f} GiB", int(gib * 2**30))]
    pcts = sorted(set(args.budgets), reverse=True)
    return [(f"{p}% of {weights / 2**30:.2f} GiB", int(p / 100 * weights) + extra) for p in pcts]


def bandwidths(device: torch.device, args: Any) -> dict[str, Any]:
    nbytes = (64 << 20) if args.quick or device.type != "cuda" else (1 << 30)
    bw: dict[str, Any] = {
        "h2d_pinned_gbs": measure.h2d_bandwidth(device, nbytes, pinned=True),
        "h2d_pageable_gbs": measure.h2d_bandwidth(device, nbytes, pinned=False),
        "read_gbs": None,
        "gemm_tflops": None,
    }
    if device.type == "cuda":
        from .ceilings import read_bandwidth

        bw["read_gbs"] = read_bandwidth()
        bw["gemm_tflops"] = measure.gemm_tflops(device, torch.bfloat16)
    return bw


def run_budget(config: EngineConfig, label: str, args: Any) -> dict[str, Any]:
    """One engine at one budget: its placement, decode and prefill in every mode."""
    row: dict[str, Any] = {"label": label, "budget_bytes": config.gpu_memory_budget}
    print(f"[{label}] building the engine", flush=True)
    t0 = time.perf_counter()
    try:
        engine = LLMEngine(config)
    except BudgetTooSmallError as exc:
        row["refused"] = str(exc)
        print(f"[{label}] refused: {exc}", flush=True)
        return row
    with engine:
        row["build_s"] = time.perf_counter() - t0
        off = engine.offload
        row["placement"] = off.placement.describe() if off else "no offload: every weight fits"
        row["offloaded_bytes"] = off.placement.offloaded_bytes if off else 0
        row["ring_bytes"] = off.ring.nbytes if off else 0
        row["weights_gpu_bytes"] = measure.weights_gpu_bytes(engine)
        # The prefill's matmuls: every layer weight once per token (lm_head: one row).
        row["layer_params"] = sum(p.numel() for p in engine.model.model.layers.parameters())
        print(f"[{label}] {row['placement']}", flush=True)
        modes = [m for m in args.modes if usable(engine, m)]
        peers: dict[str, LayerHooks] = {}  # built once per engine
        row["decode"] = [decode_modes(engine, b, modes, peers, args) for b in args.batches]
        row["prefill"] = prefill_modes(engine, modes, peers, args)
        row["prefill_stream"], row["prefill_traces"] = prefill_stream(engine, args)
        row["stats"] = asdict(off.stats()) if off else None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def usable(engine: LLMEngine, mode: str) -> bool:
    if mode == "graphs":
        return engine.runner.graphs is not None
    return engine.offload is not None or not mode.startswith("naive")


def decode_modes(
    engine: LLMEngine, batch: int, modes: list[str], peers: dict[str, LayerHooks], args: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {"batch": batch}
    for m in modes:
        print(f"  decode batch {batch}: {m}", flush=True)
        with measure.mode(engine, m, peers):
            row = measure.decode_row(engine, batch, args.decode_ctx, args.decode_steps)
        d[m] = row["step_ms"]
        d.setdefault("weight_bytes", row["weight_bytes"])
        d.setdefault("kv_bytes_read", row["kv_bytes_read"])
    return d


def prefill_modes(
    engine: LLMEngine, modes: list[str], peers: dict[str, LayerHooks], args: Any
) -> dict[str, Any]:
    """Prefill is eager in every mode: ``ours`` is the prefetcher, then the peers."""
    p: dict[str, Any] = {}
    for m in ["ours", *(m for m in modes if m.startswith("naive"))]:
        print(f"  prefill {args.prefill_tokens} tokens: {m}", flush=True)
        with measure.mode(engine, "eager" if m == "ours" else m, peers):
            p[m] = measure.prefill_ms(engine, args.prefill_tokens, args.reps)
    return p


def prefill_stream(engine: LLMEngine, args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prefetcher's prefill back to back (``measure.prefill_stream_ms``), and the
    weight copies of one idle prefill and of one stream, timed on the copy stream."""
    n, tokens = args.prefill_stream, args.prefill_tokens
    print(f"  prefill {tokens} tokens: ours, {n} back to back", flush=True)
    with measure.mode(engine, "eager"):
        ms = measure.prefill_stream_ms(engine, tokens, n)
        with measure.copy_trace(engine) as idle:
            measure.prefill_ms(engine, tokens, 0)
        with measure.copy_trace(engine) as stream:
            measure.prefill_stream_ms(engine, tokens, n, warm=False)
    return {"ours": ms}, {"idle": idle, "stream": stream}
