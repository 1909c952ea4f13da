"""Where a workload's KV mapping happens, without a GPU: the torch-free scheduler and
KV manager replay it, and every step's commands are counted.

    python3 benchmarks/mapping_sim.py [--num-prompts 500 --input-len 1024 --output-len 128]

A chunk mapped by the commands a step needs (``kv_commands``) is mapped on the critical
path: the step's forward waits for the mapper thread (~30 us a chunk on an H100,
``cuMemSetAccess`` dominating: shared/NOTES.md). One mapped by ``ahead_commands``
(premap, lookahead) overlaps an earlier step. The geometry is the Llama-3-8B shape's
on an H100 (128 KiB a token, 2 MiB chunks, a 52.6 GiB pool, 256 seats), so the counts
explain the zero-hit cost of prefix caching measured there
(``benchmarks/results/prefix_h100_2026-11-22/offline_zero_hit_shipped.txt``): once every
seat is taken no slot is idle, so nothing can be premapped; without the cache a finished
request's slot still maps private chunks that the next one reuses in place, with it
those chunks are cached and the next (zero-hit) request maps fresh ones in its own step.
"""

from __future__ import annotations

import argparse
import random

from vtensor.engine.kv_setup import spare_slots
from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request
from vtensor.engine.scheduler import Scheduler, SchedulerConfig
from vtensor.kvcache.commands import KVCommand, MapCachedCommand
from vtensor.kvcache.geometry import KVGeometry
from vtensor.kvcache.manager import KVCacheManager, MapCommand, UnmapCommand
from vtensor.kvcache.radix_cache import RadixPrefixCache

CHUNK, TOKEN_BYTES, POOL_BYTES = 2 << 20, 128 << 10, int(52.6 * 2**30)


def replay(args: argparse.Namespace, cache_on: bool) -> dict[str, int]:
    spare = spare_slots(args.max_num_seqs, 4096, cache_on)
    slots = args.max_num_seqs + 1 + spare
    geo = KVGeometry(slots, 4096, TOKEN_BYTES, CHUNK, POOL_BYTES // CHUNK)
    cache = RadixPrefixCache(*geo.cache_block()) if cache_on else None
    watermark = max(64, geo.capacity_chunks // 20)  # the engine's default
    kv = KVCacheManager(geo, keep_idle_chunks=watermark, prefix_cache=cache, reserved_slots=1)
    s = Scheduler(SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, 4), kv)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rounds: dict[int, int] = {}  # rid -> its conversation's round

    def ask(rid: int, history: list[int], round_: int) -> None:
        ids = [*history, *(rng.randrange(1, 128_000) for _ in range(args.input_len))]
        rounds[rid] = round_
        s.add(Request.new(rid, ids, params, len(ids) + args.output_len, 0.0))

    for rid in range(args.num_prompts):
        ask(rid, [], 0)
    n = {"steps": 0, "critical": 0, "critical_steps": 0, "ahead": 0, "unmapped": 0}
    while s.waiting or s.running:
        out = s.schedule()
        n["steps"] += 1
        for a in out.admitted:
            a.req.admit(a.num_cached)
        for sp in out.spans:
            sp.req.advance(sp.end, sp.samples)
        now = _mapped(out.kv_commands)
        n["critical"] += now
        n["critical_steps"] += now > 0
        n["ahead"] += _mapped(out.ahead_commands)
        every = out.kv_commands + out.ahead_commands
        n["unmapped"] += sum(c.count for c in every if isinstance(c, UnmapCommand))
        for sp in out.spans:
            if not sp.samples:
                continue
            req = sp.req
            req.append_output(sp.end, rng.randrange(1, 128_000), None, 0.0)
            if req.num_output >= args.output_len:
                s.remove(req)
                req.finish("length")
                if rounds[req.rid] + 1 < args.rounds:  # the conversation goes on
                    ask(req.rid + args.num_prompts, list(req.token_ids), rounds[req.rid] + 1)
    return n


def _mapped(commands: list[KVCommand]) -> int:
    """Chunks the commands map: fresh ones and cached ones (both cost a cuMemMap and a
    cuMemSetAccess each)."""
    fresh = sum(c.count for c in commands if isinstance(c, MapCommand))
    return fresh + sum(len(c.chunks) for c in commands if isinstance(c, MapCachedCommand))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="turns per conversation: each "
        "re-sends its history (the last prompt and answer) and asks anew",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = p.parse_args()
    print("cache  steps  critical-path chunks (steps)  ahead chunks  unmapped chunks")
    for on in (False, True):
        n = replay(args, on)
        crit = f"{n['critical']:>20,} ({n['critical_steps']:>4})"
        tail = f"{n['ahead']:>12,}  {n['unmapped']:>15,}"
        print(f"{'on' if on else 'off':<5} {n['steps']:>6}  {crit}  {tail}")


if __name__ == "__main__":
    main()
