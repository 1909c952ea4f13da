"""Issue 14's heterogeneous mapping experiment: host-located KV chunks mapped into the
KV range and read by decode attention over the interconnect, with no copy.

1. A probe in a child process (a fault there cannot poison this process's CUDA
   context): host-located chunks created, mapped in a device range, written and read.
2. Copy bandwidth host <-> device, 2 MiB and 64 MiB: a pinned buffer
   (cudaHostRegister, what the host KV tier holds today) against host-located
   ``cuMemCreate`` chunks mapped in a virtual range (copy engine and SM kernel).
3. Decode (``vtensor.kernels`` decode, Llama-3-8B heads: 32 query / 8 KV, d=128, bf16)
   over a real ``KVArena`` at batch 1/8/32 and contexts 4k/16k/32k, with 0/10/25/50% of
   each request's earliest chunks host-located: ms per call (CUDA graph replay, one
   layer per call), GB/s, slowdown against 0%, and what copying the same tokens back
   (swap-in at the pinned rate, all 32 layers of Llama-3-8B) would cost instead.
4. A stride check: the sweep's arena keeps ``--layers`` layers per token (8: 32 GiB for
   32 x 32k tokens; 32 layers would need 128 GiB), so rows lie 32 KiB apart instead of
   Llama-3-8B's 128 KiB; batch 8 x 4k is re-run on a 32-layer arena at 0% and 50%.

Writes the JSON after each part (a timeout keeps what was done); prints the report.
    python3 benchmarks/hetero_h100.py --out benchmarks/results/hetero_h100.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from vtensor.bench.hetero_copy import best_rate, copy_rates, rates_table
from vtensor.bench.hetero_decode import Q_HEADS, HeteroArena, time_decode
from vtensor.bench.hetero_report import derive, report
from vtensor.kernels.splitk import DecodeWorkspace
from vtensor.kvcache import KVLayout
from vtensor.memory import ChunkPool, VirtualTensor, open_backend
from vtensor.memory.cuda import CudaBackend

MiB = 1 << 20


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--layers", type=int, default=8, help="layers per token in the sweep arena")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--shares", default="0,0.1,0.25,0.5", help="host-located share; 0 first")
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip what starts later")
    ap.add_argument("--probe", action="store_true", help="(internal) the child's probe")
    return ap.parse_args()


def probe() -> int:
    """Child process: one host-located chunk pair in a device range, written and read."""
    dev_b = open_backend("cuda")
    host_b = open_backend("cuda", location="host")
    assert isinstance(dev_b, CudaBackend) and isinstance(host_b, CudaBackend)
    cs = dev_b.chunk_size
    dev, host = ChunkPool(dev_b, 4 * cs), ChunkPool(host_b, 4 * cs)
    with VirtualTensor(dev, 4 * cs) as vt:
        vt.map(0, 2 * cs, pool=host)
        vt.map(2 * cs, cs)
        x = vt.view(torch.float32, (3 * cs // 4,))
        data = torch.randn(x.shape, device="cuda")
        x.copy_(data)
        x.mul_(2.0)
        back = x.cpu()
        ok = torch.equal(back, (data * 2.0).cpu())
        where = [dev_b.location_at(vt.va + i * cs).kind for i in range(3)]
        access = [dev_b.device_can_access(vt.va + i * cs) for i in range(3)]
    for pool in (dev, host):
        pool.close()
    host_b.close()
    dev_b.close()
    info = {
        "ok": ok and where == ["host", "host", "device"] and all(access),
        "bytes_equal": ok,
        "driver_locations": where,
        "device_access": access,
        "chunk_size": cs,
        "host_chunk_size": host_b.chunk_size,
        "host_location": asdict(host_b.chunk_location),
    }
    print(json.dumps(info), flush=True)
    return 0 if info["ok"] else 1


def run_probe() -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "probe timed out (150 s)"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    found: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or not found.get("ok"):
        found["ok"] = False
        found["error"] = f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
    return found


def device_info() -> dict[str, Any]:
    from cuda.bindings import driver as cu

    from vtensor.memory.cuda_location import device_attribute, driver_version

    torch.cuda.init()
    if int(cu.cuInit(0)[0]) != 0:
        raise RuntimeError("cuInit failed")
    dev = cu.cuDeviceGet(0)[1]
    attrs = (
        "CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID",
        "CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
        "CU_DEVICE_ATTRIBUTE_HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
        "CU_DEVICE_ATTRIBUTE_NUMA_CONFIG",
    )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "driver_version": driver_version(cu),
        "attributes": {a: device_attribute(cu, dev, a) for a in attrs},
    }


class Run:
    """The results, written after each part; the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.res: dict[str, Any] = {"args": vars(args), "errors": [], "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.res, f, indent=1)

    def error(self, where: str, exc: BaseException) -> None:
        self.res["errors"].append(f"{where}: {type(exc).__name__}: {str(exc)[:400]}")
        print(f"ERROR {where}: {type(exc).__name__}: {exc}", flush=True)


def warm(run: Run, pool: ChunkPool, n: int) -> dict[str, float]:
    """Create ``n`` chunks now (timed), so the sweep's remaps pay no ``cuMemCreate``. A
    failure (host memory short, say) is recorded; the remaps that need more then fail,
    recorded too."""
    t = time.perf_counter()
    try:
        pool.warm(n)
    except Exception as exc:
        run.error(f"creating {n} {pool.backend.location} chunks", exc)
    s = time.perf_counter() - t
    made = pool.stats().created
    return {"chunks": made, "s": round(s, 3), "us_per_chunk": round(s / max(made, 1) * 1e6, 1)}


def sweep(run: Run, h: HeteroArena, ws: DecodeWorkspace, key: str, points: Any) -> None:
    """Time every (ctx, share, batch) of ``points``; shares ascend within a context."""
    rows: list[dict[str, Any]] = run.res.setdefault(key, [])
    for ctx, shares, batches in points:
        for share in shares:
            # At least one chunk for a share > 0: a rounded-away share would time 0% twice.
            host = max(1, round(share * h.chunks_for(ctx))) if share > 0 else 0
            if run.left() < 0:
                run.res["skipped"].append(f"{key} ctx {ctx} share {share}: time budget")
                continue
            t = time.perf_counter()
            try:
                h.set_host_chunks(host)  # remaps, then asks the driver where each chunk lives
            except Exception as exc:  # a failed remap or check ends this sweep, recorded
                run.error(f"{key} remap ctx {ctx} share {share}", exc)
                run.save()
                return
            remap_s = time.perf_counter() - t
            for batch in batches:
                try:
                    d = time_decode(h, batch, ctx, ws)
                except Exception as exc:  # recorded; a dead context stops the sweep below
                    run.error(f"{key} batch {batch} ctx {ctx} share {share}", exc)
                    run.save()
                    torch.cuda.synchronize()
                    continue
                row = {**asdict(d), "gbs": d.gbs, "remap_s": round(remap_s, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        run.save()


def main() -> int:
    args = parse()
    if args.probe:
        return probe()
    run = Run(args)
    try:
        run.res["device"] = device_info()
    except Exception as exc:  # informational only
        run.error("device_info", exc)
    run.res["probe"] = found = run_probe()
    print("probe:", json.dumps(found), flush=True)
    run.save()
    if not found.get("ok"):
        print("host-located chunks do not work here: nothing to measure", flush=True)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    shares = sorted(float(s) for s in args.shares.split(","))
    dev_b, host_b = open_backend("cuda"), open_backend("cuda", location="host")
    assert isinstance(host_b, CudaBackend)
    layout = KVLayout(max(batches), max(contexts), args.layers, 8, 128)
    per_slot = layout.slot_stride * layout.itemsize // dev_b.chunk_size
    host_need = layout.num_slots * round(max(shares) * per_slot) + 64 * MiB // host_b.chunk_size
    dev = ChunkPool(dev_b, (layout.num_slots * per_slot + 64) * dev_b.chunk_size)
    host = ChunkPool(host_b, host_need * host_b.chunk_size)
    run.res["memory"] = {
        "host_location": asdict(host_b.chunk_location),
        "chunk_size": dev_b.chunk_size,
        "sweep_layout": {"layers": args.layers, "bytes_per_token": layout.bytes_per_token},
        "device_create": warm(run, dev, layout.num_slots * per_slot),
        "host_create": warm(run, host, host_need),
    }
    print("memory:", json.dumps(run.res["memory"]), flush=True)
    rates, copy_errors = copy_rates(host, torch.device("cuda", 0))
    run.res["errors"] += [f"copy {e}" for e in copy_errors]
    run.res["copy"] = rates_table(rates)
    for r in run.res["copy"]:
        print(json.dumps(r), flush=True)
    run.save()
    ws = DecodeWorkspace.for_batch(max(batches), Q_HEADS, 128, torch.device("cuda", 0))
    h = HeteroArena(layout, dev, host)
    try:
        sweep(run, h, ws, "decode", [(c, shares, batches) for c in contexts])
    finally:
        h.close()
    stride = KVLayout(8, 4096, 32, 8, 128)
    if run.left() > 20 and 8 in batches:
        h = HeteroArena(stride, dev, host)
        try:
            sweep(run, h, ws, "stride_check", [(4096, [0.0, 0.5], [8])])
        finally:
            h.close()
    else:
        run.res["skipped"].append("stride_check: time budget or no batch 8")
    pinned = best_rate(rates, "pinned", "h2d")
    run.res["derived"] = derive(run.res.get("decode", []), pinned)
    run.res["stride_derived"] = derive(run.res.get("stride_check", []), pinned)
    run.save()
    print(report(run.res), flush=True)
    for pool in (dev, host):
        pool.close()
    host_b.close()
    dev_b.close()
    return 1 if run.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
