"""Sleep and wake (issue 13): what ``LLM.sleep(level)`` gives back and how long sleep and
wake take, against the pinned host<->device copy ceiling measured in the same run.

python3 benchmarks/sleep_wake.py --shape llama3-8b --out benchmarks/results/sleep_wake_h100.json

One engine with sleep mode (random bf16 weights of --shape). Each cycle first runs a
workload so that the engine holds KV (idle slots keep their chunks: no idle limit),
then: ``memory_stats`` (weights + KV held), cudaMemGetInfo, ``sleep(level)``,
cudaMemGetInfo again (bytes freed; goal >= 95% of held), ``wake_up()``, and the same
workload again, whose greedy tokens must equal the first cycle's (checked).

The ceiling: a pinned buffer of --ceiling-gib copied device->host and host->device
(best of 3; GB/s = 1e9 bytes/s). A level-1 sleep is bounded by pinning the host copy
(``cudaHostRegister`` of the weights' size, measured apart as ``pin_s``, and without
the parallel prefault as ``pin_without_prefault_s``) plus the device->host copy; with
the kept host buffer (the default) only the first level-1 sleep pins; a level-1 wake
by the host->device copy. A level-2 wake here re-draws
the seed's random weights on the GPU (a --shape model has no checkpoint), so it
measures that, not reading a checkpoint. Under 5 minutes on an H100 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from vtensor.bench.datasets import random_dataset
from vtensor.engine.llm import LLM
from vtensor.engine.params import SamplingParams
from vtensor.memory import PinnedHostMemory

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-gib", type=float, default=24.0)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--cycles", type=int, default=2, help="sleep/wake cycles per level")
    ap.add_argument("--ceiling-gib", type=float, default=4.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sleep_wake.py measures the GPU: no CUDA device here")
    ceiling = copy_ceiling(int(args.ceiling_gib * GiB))
    t0 = time.perf_counter()
    llm = LLM(
        shape=args.shape, dtype=args.dtype, enable_sleep_mode=True,
        kv_cache_bytes=int(args.kv_cache_gib * GiB), keep_idle_chunks=1 << 40,
        kv_idle_timeout_s=None, enable_prefix_caching=False,
        max_model_len=args.input_len + args.output_len + 64,
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    try:
        weights = llm.engine.weights
        assert weights is not None
        pin_s = pin_cost(weights.region.nbytes)
        pin_plain_s = pin_cost(weights.region.nbytes, prefault=False)
        rows = run_cycles(llm, args)
    finally:
        llm.close()
    payload = {
        "args": vars(args), "device": torch.cuda.get_device_name(), "build_s": build_s,
        "ceiling": ceiling, "pin_s": pin_s,
        "pin_without_prefault_s": pin_plain_s, "rows": rows,
    }  # fmt: skip
    report(payload)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.out}")


def copy_ceiling(nbytes: int) -> dict[str, float]:
    """Pinned host<->device copy rates (GB/s), best of 3 each way."""
    host = PinnedHostMemory(pin=True)
    try:
        buf = host.alloc(nbytes)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        rates: dict[str, float] = {}
        for name, dst, src in (("h2d_gbps", dev, buf.tensor), ("d2h_gbps", buf.tensor, dev)):
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            rates[name] = nbytes / best / 1e9
        del dev
        torch.cuda.empty_cache()
    finally:
        host.close()
    return rates


def pin_cost(nbytes: int, prefault: bool = True) -> float:
    """Seconds to allocate and register (pin) a host buffer of the weights' size, the
    part of a level-1 sleep that is not the copy."""
    host = PinnedHostMemory(pin=True, prefault=prefault)
    try:
        t = time.perf_counter()
        host.alloc(nbytes)
        return time.perf_counter() - t
    finally:
        host.close()


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def run_cycles(llm: LLM, args: argparse.Namespace) -> list[dict[str, Any]]:
    vocab = llm.engine.model_config.vocab_size
    reqs = random_dataset(args.num_prompts, args.input_len, args.output_len, vocab, seed=1)
    prompts = [r.prompt_ids for r in reqs]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]  # warm too
    rows = []
    for level in (1, 2):
        for cycle in range(args.cycles):
            row = one_cycle(llm, level)
            t = time.perf_counter()
            tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            row.update(
                cycle=cycle,
                first_workload_after_wake_s=time.perf_counter() - t,
                tokens_equal=tokens == reference,
            )
            rows.append(row)
            print(f"level {level} cycle {cycle}: {row}", flush=True)
    return rows


def one_cycle(llm: LLM, level: int) -> dict[str, Any]:
    held = llm.memory_stats()
    free0 = free_bytes()
    t = time.perf_counter()
    llm.sleep(level)
    torch.cuda.synchronize()
    sleep_s = time.perf_counter() - t
    free1 = free_bytes()
    t = time.perf_counter()
    llm.wake_up()
    torch.cuda.synchronize()
    wake_s = time.perf_counter() - t
    free2 = free_bytes()
    engine_bytes = held.weights_bytes + held.kv_held_bytes
    return dict(
        level=level,
        weights_bytes=held.weights_bytes,
        kv_held_bytes=held.kv_held_bytes,
        held_bytes=engine_bytes,
        freed_bytes=free1 - free0,
        freed_share=(free1 - free0) / engine_bytes,
        sleep_s=sleep_s,
        wake_s=wake_s,
        retaken_by_wake_bytes=free1 - free2,
    )


def report(payload: dict[str, Any]) -> None:
    c = payload["ceiling"]
    print(
        f"\n{payload['device']}: pinned copy ceiling h2d {c['h2d_gbps']:.1f} GB/s, "
        f"d2h {c['d2h_gbps']:.1f} GB/s; pinning the weights' size takes "
        f"{payload['pin_s']:.2f} s ({payload['pin_without_prefault_s']:.2f} s without "
        f"prefaulting); engine built in {payload['build_s']:.1f} s"
    )
    head = (
        f"{'lvl':>3} {'held GB':>8} {'freed GB':>8} {'freed %':>7} {'sleep s':>7} "
        f"{'of d2h':>6} {'wake s':>7} {'wake GB/s':>9} {'of h2d':>6} {'same tokens':>11}"
    )
    print(head)
    for r in payload["rows"]:
        # The weights' bytes over the seconds, as a share of the copy ceiling each way.
        out = r["weights_bytes"] / r["sleep_s"] / 1e9 / c["d2h_gbps"]
        rate = r["weights_bytes"] / r["wake_s"] / 1e9
        print(
            f"{r['level']:>3} {r['held_bytes'] / 1e9:>8.2f} {r['freed_bytes'] / 1e9:>8.2f} "
            f"{100 * r['freed_share']:>6.1f}% {r['sleep_s']:>7.2f} {out:>6.0%} "
            f"{r['wake_s']:>7.2f} {rate:>9.1f} {rate / c['h2d_gbps']:>6.0%} "
            f"{r['tokens_equal']!s:>11}"
        )
    ok = all(r["freed_share"] >= 0.95 and r["tokens_equal"] for r in payload["rows"])
    print(f"goal (>= 95% freed, tokens unchanged): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
