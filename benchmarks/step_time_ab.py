"""Decode step time through the engine's public API only, for A/B runs of two checkouts.

One process imports one vtensor, so an A/B comparison runs this script once per
checkout (``PYTHONPATH=path/to/checkout``), alternating A B A B on one machine.
It uses only what every version has: ``EngineConfig(shape=...)``, ``add_request``
(an id, or a list of one per sample), ``step``, ``abort``, ``pop``. Each timed step
must deliver one token to every request of the batch (asserted), so the batch
really is B.

    python3 benchmarks/step_time_ab.py --label after --batches 1,64,256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vtensor
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams


def _sync(engine: LLMEngine) -> None:
    if engine.runtime.device.type == "cuda":
        torch.cuda.synchronize()  # async scheduling leaves the last step running


def _add(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> int:
    """One request's id: ``add_request`` returns it, or (since the engine owns the request
    contract and expands ``n``) a list with one id per sample."""
    got: object = engine.add_request(prompt, params)
    rid = got[0] if isinstance(got, list) else got
    assert isinstance(rid, int)
    return rid


def measure(engine: LLMEngine, batch: int, ctx: int, steps: int) -> float:
    """Mean seconds per decode step with ``batch`` requests at context ~``ctx``."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=2 * steps + 64, ignore_eos=True, temperature=0)
    rids = [_add(engine, [(i * 7 + j) % vocab for j in range(ctx)], params) for i in range(batch)]
    got = dict.fromkeys(rids, 0)
    while min(got.values()) < 2:  # prefill everyone, then one decode each
        for o in engine.step():
            got[o.rid] += len(o.new_token_ids)
    _sync(engine)
    t0 = time.perf_counter()
    delivered = [sum(len(o.new_token_ids) for o in engine.step()) for _ in range(steps)]
    _sync(engine)
    dt = (time.perf_counter() - t0) / steps
    if any(n != batch for n in delivered):
        raise RuntimeError(f"the batch changed while timed: tokens per step {delivered}")
    for r in rids:
        engine.abort(r)
        engine.pop(r)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--shape", default="llama3-8b", help="'embedded' for the tiny model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None, help="append one JSON line per batch here")
    args = ap.parse_args()
    shape = None if args.shape == "embedded" else args.shape
    cfg = EngineConfig(shape=shape, device=args.device, max_model_len=4096 if shape else None)
    with LLMEngine(cfg) as engine:
        measure(engine, 8, args.ctx, 8)  # warm-up: compiles, first mappings
        for b in (int(x) for x in args.batches.split(",")):
            ms = measure(engine, b, args.ctx, args.steps) * 1e3
            row = {"label": args.label, "vtensor": vtensor.__file__, "batch": b, "step_ms": ms}
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
