"""Builds the host KV tier: its size, the cost model's rates, the planner and swapper.

The rates the cost model compares (``kvcache/swap_policy.py``) are measured once
here on CUDA: the pinned host-to-device copy bandwidth (one 64 MiB copy each way,
the slower counted) and the dense matmul rate in the model's dtype (one 4096^3
matmul, after a warm-up). On the CPU the documented constants stand in.
"""

from __future__ import annotations

import logging
import time

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.host_tier import SlotHostTier
from vtensor.kvcache.swap_policy import (
    CPU_COPY_BYTES_PER_S,
    CPU_FLOPS_PER_S,
    ModelCost,
    SwapCostModel,
)
from vtensor.models.config import ModelConfig

from .config import EngineConfig
from .swap import KVSwapper
from .swap_driver import SwapDriver
from .swap_plan import SwapPlanner

log = logging.getLogger("vtensor.engine.swap")


def swap_driver(
    config: EngineConfig, cfg: ModelConfig, arena: KVArena, dtype: torch.dtype
) -> SwapDriver | None:
    """The tier of ``config.swap_space_bytes`` (None when 0: recompute only)."""
    if not config.swap_space_bytes:
        return None
    chunk = arena.geometry.chunk_size
    slots = config.swap_space_bytes // chunk
    device = arena.tensor.device
    if device.type == "cuda":
        copy_rate, flops = measure_copy_rate(device), measure_flops(device, dtype)
        torch.cuda.empty_cache()  # the measurements' buffers: not the workspace's to keep
    else:
        copy_rate, flops = CPU_COPY_BYTES_PER_S, CPU_FLOPS_PER_S
    cost = ModelCost(cfg.num_params(), cfg.num_layers, cfg.q_size)
    model = SwapCostModel(cost, copy_rate, flops, config.preemption_mode)
    log.info(
        "host KV tier: %d chunks (%.2f GiB); copy %.1f GB/s, compute %.1f TFLOP/s, mode %s",
        slots,
        slots * chunk / 2**30,
        copy_rate / 1e9,
        flops / 1e12,
        config.preemption_mode or "cost model",
    )
    swapper = KVSwapper(arena, slots, device)
    return SwapDriver(SwapPlanner(SlotHostTier(slots), model, chunk), swapper)


def measure_copy_rate(device: torch.device, nbytes: int = 64 << 20) -> float:
    """Pinned host <-> device copy bandwidth, bytes/s (the slower direction)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev), (dev, host), (host, dev)):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(nbytes / (time.perf_counter() - t0))
    return min(max(rates[0::2]), max(rates[1::2]))


def measure_flops(device: torch.device, dtype: torch.dtype, n: int = 4096) -> float:
    """Dense matmul rate in ``dtype``, FLOP/s (fp32 is measured as it runs: TF32 or not)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    return 3 * 2 * n**3 / (time.perf_counter() - t0)
