"""Find first-time stalls on the serving path (issue 11 §4): after serve's warm-up,
run steps of the shapes serving sees (a 1024-token prefill with 1, 2, 12 decodes, a
4096-token one, odd sizes), each synchronously and twice, printing its time and what
changed in between: the caching allocator's device mallocs and retries, and Dynamo's
compile count. A step much slower the first time than the second is a stall.

    TORCH_LOGS=recompiles PYTHONPATH=. python3 benchmarks/step_stalls.py
"""

from __future__ import annotations

import argparse
import time

import torch

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.warmup import warm_up

# (prefill tokens, decode rows): serving's shapes, then three again (second time).
STEPS = [(1024, 1), (1024, 2), (1024, 12), (4000, 3), (1000, 5), (2047, 40), (4095, 96)]
STEPS += [(1024, 1), (4000, 3), (2047, 40)]


def _counters() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {
        "mallocs": stats.get("num_device_alloc", 0),
        "retries": stats.get("num_alloc_retries", 0),
        "frees": stats.get("num_device_free", 0),
        "dynamo_graphs": compiles,
    }


def _mixed(engine: LLMEngine, prefill: int, decodes: int, vocab: int) -> str:
    """Start ``decodes`` short requests, then time the step that prefills ``prefill``
    tokens beside their decodes."""
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    rids = [engine.add_request([7 + i] * 8, params)[0] for i in range(decodes)]
    for _ in range(3):
        engine.step()  # their prefills, then decoding
    rids += engine.add_request([(t * 31) % vocab for t in range(prefill)], params)
    torch.cuda.synchronize()
    before, t0 = _counters(), time.perf_counter()
    engine.step()
    engine.step()  # with async scheduling the step above is read here
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    after = _counters()
    for rid in rids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    for rid in rids:
        engine.pop(rid)
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    return f"prefill {prefill:5d} + {decodes:3d} decodes: {ms:7.1f} ms {delta}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args()
    cfg = EngineConfig(
        shape=args.shape, max_model_len=4096, max_num_batched_tokens=args.max_num_batched_tokens
    )
    with LLMEngine(cfg) as engine:
        print(f"warm-up {warm_up(engine):.1f}s; {_counters()}", flush=True)
        vocab = engine.model_config.vocab_size
        for prefill, decodes in STEPS:
            print(_mixed(engine, prefill, decodes, vocab), flush=True)


if __name__ == "__main__":
    main()
