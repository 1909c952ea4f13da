"""Measured HBM ceilings: a Triton read-only kernel and a device-to-device copy."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc, 0))


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a persistent Triton kernel that only reads ``nbytes`` of bf16."""
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = 8 * sms
    out = torch.empty(grid, device="cuda", dtype=torch.float32)
    ms = triton.testing.do_bench(
        lambda: _read_kernel[(grid,)](x, out, x.numel(), BLOCK=4096, num_warps=8),
        warmup=50,
        rep=300,
        return_mode="median",
    )
    return nbytes / ms / 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    a = torch.randn(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / ms / 1e6
