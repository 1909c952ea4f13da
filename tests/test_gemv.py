"""The small-batch GEMV against fp32 torch: every mode, split-K, tails, the checks.

On the CPU the kernel runs in the Triton interpreter (tiny shapes); on a GPU
machine the same tests run the compiled kernel (``test_gemv_gpu.py`` adds the real
Llama shapes and CUDA graphs). The bound (``reference.linear_error_bound``): the
output's one rounding to bf16/fp16 (2·u·|ref|, u = 2^-8 / 2^-11) plus the worst
case of two fp32 sums over K (ours, the reference's): never flaky, and an indexing
or masking error (a wrong row, a lost tail) is off by O(|ref|).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vtensor.kernels.gemv import _partials, check_gemv_args, gemv, should_use_gemv
from vtensor.kernels.gemv_config import MAX_M, GemvConfig, choose_config, choose_split
from vtensor.kernels.reference import linear_error_bound, linear_ref
from vtensor.models.linear import Linear, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, K): tails in N (37, 20) and K (100, 77: not even a multiple of 8), one row, and
# K long enough for several blocks and splits.
SHAPES = [(37, 100), (64, 256), (20, 77), (1, 16), (48, 1024)]
CONFIGS = [  # small blocks, so tiny shapes take several blocks and loop iterations
    GemvConfig(block_n=4, block_k=32, num_warps=1, mode="deferred"),
    GemvConfig(block_n=8, block_k=16, num_warps=1, mode="step"),
    GemvConfig(block_n=16, block_k=32, num_warps=1, mode="dot"),
    GemvConfig(block_n=2, block_k=16, num_warps=1, mode="deferred", split_k=3),
    GemvConfig(block_n=16, block_k=64, num_warps=2, mode="dot", split_k=4),
]


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "output has NaN (unwritten or broken)"
    err = (y.float() - linear_ref(x, w)).abs()
    bound = linear_error_bound(x, w, x.dtype)
    worst = float((err - bound).max())
    assert worst <= 0, f"error exceeds the bound by {worst} (max err {float(err.max())})"


def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("m", range(1, MAX_M + 1))
@pytest.mark.parametrize("n,k", SHAPES)
def test_table_config_matches_fp32(m: int, n: int, k: int) -> None:
    x, w = rand(m, k), rand(n, k)
    assert_within_bound(gemv(x, w), x, w)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mode_and_split(config: GemvConfig, m: int, dtype: torch.dtype) -> None:
    for n, k in [(37, 100), (48, 256)]:
        x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype)
        assert_within_bound(gemv(x, w, config), x, w)


def test_strided_x_and_extremes() -> None:
    """x a column slice (row stride ≠ K), as the model's views can be; K = 1; N = 0."""
    base = rand(5, 300)
    x, w = base[:, 100:260], rand(33, 160)
    assert x.stride(0) == 300
    assert_within_bound(gemv(x, w), x, w)
    x1, w1 = rand(2, 1), rand(9, 1)
    assert_within_bound(gemv(x1, w1, CONFIGS[0]), x1, w1)
    assert gemv(rand(3, 8), rand(0, 8)).shape == (3, 0)
    empty = gemv(rand(3, 0), rand(4, 0))
    assert torch.equal(empty, torch.zeros(3, 4, dtype=torch.bfloat16, device=empty.device))


def test_split_scratch_is_reused() -> None:
    """The split-K partial buffer is cached per (device, split, M, N): the same shape
    reuses it (a captured graph keeps its address), another shape gets its own."""
    cfg = CONFIGS[3]
    x, w = rand(3, 64), rand(10, 64)
    assert_within_bound(gemv(x, w, cfg), x, w)
    key = (x.device, 3, 3, 10)
    first = _partials[key].data_ptr()
    x2, w2 = rand(3, 64), rand(10, 64)
    assert_within_bound(gemv(x2, w2, cfg), x2, w2)
    assert _partials[key].data_ptr() == first
    gemv(rand(2, 64), w, cfg)
    assert (x.device, 3, 2, 10) in _partials


def test_bad_arguments_are_clear_errors() -> None:
    x, w = rand(2, 16), rand(8, 16)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        gemv(x[None], w)
    with pytest.raises(ValueError, match="K=16"):
        gemv(x, rand(8, 32))
    with pytest.raises(ValueError, match=r"1\.\.16 rows"):
        gemv(rand(17, 16), w)
    with pytest.raises(ValueError, match=r"1\.\.16 rows"):
        gemv(rand(0, 16), w)
    with pytest.raises(TypeError, match="share one of"):
        gemv(x, w.half())
    with pytest.raises(TypeError, match="share one of"):
        gemv(x.float(), w.float())
    with pytest.raises(ValueError, match="contiguous weight"):
        gemv(x, rand(16, 8).T)
    with pytest.raises(ValueError, match="unit stride"):
        gemv(rand(16, 2).T, w)
    check_gemv_args(x, w)  # and the valid call passes


def test_config_validation_and_table() -> None:
    with pytest.raises(ValueError, match="mode"):
        GemvConfig(4, 256, 1, mode="tensor")
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(3, 256, 1)
    with pytest.raises(ValueError, match=r"tl\.dot"):
        GemvConfig(8, 128, 4, mode="dot")
    with pytest.raises(ValueError, match=r"1\.\.16"):
        choose_config(17, 4096, 4096, 132)
    assert GemvConfig(64, 128, 4, mode="dot").block_m(1) == 16
    assert [GemvConfig(4, 256, 1).block_m(m) for m in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    for m in range(1, MAX_M + 1):  # Llama-3-8B on an H100: every table choice is valid
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]:
            cfg = choose_config(m, n, k, 132)
            blocks = -(-n // cfg.block_n)
            assert cfg.split_k == 1 or blocks * cfg.split_k // 2 < 2 * 132
            assert k >= cfg.split_k * cfg.block_k
    # Split only for too few programs, and never into splits of < 2 K blocks.
    assert choose_split(1024, 4096, 1024, 132) == 1
    assert choose_split(64, 4096, 128, 132) == 8
    assert choose_split(1, 256, 128, 132) == 1


def test_linear_dispatch_on_cpu_is_f_linear() -> None:
    """On the CPU the model's linear layers are ``F.linear`` exactly (never the GEMV):
    the HF-exactness tests keep checking the same code."""
    x, w, b = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    assert not should_use_gemv(x.bfloat16(), w.bfloat16())
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    layer = Linear(16, 5, bias=False)
    ref = nn.Linear(16, 5, bias=False)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), ref(x))


H100_CASES = [(m, choose_config(m, 4096, 4096, 132)) for m in (1, 2, 8)] + [
    (8, GemvConfig(2, 512, 2, "deferred", num_stages=3)),
    (1, GemvConfig(8, 1024, 4, "deferred", num_stages=1)),
    (4, GemvConfig(4, 256, 1, "step")),
]


def test_compiles_for_the_h100_without_spills() -> None:
    """The compiled path, which the interpreter does not check: the table's configs
    (and one of each other kind) compile for sm_90 without a GPU (``tests/gemv_sm90.py``,
    in a process without ``TRITON_INTERPRET``) and keep their accumulators in registers
    (at most a few words of stack: a spill would stall every step on the memory the
    kernel exists to spare)."""
    cases = [[m, dataclasses.asdict(cfg)] for m, cfg in H100_CASES]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.gemv_sm90", json.dumps(cases)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    for (m, cfg), usage in zip(H100_CASES, json.loads(run.stdout)):
        regs, stack, local = (
            int(re.search(rf"{key}:(\d+)", usage).group(1))  # type: ignore[union-attr]
            for key in ("REG", "STACK", "LOCAL")
        )
        # A spilled accumulator shows as kilobytes of stack (a 1024-float tile: 4040 B).
        assert regs <= 255 and stack <= 64 and local == 0, (m, cfg.label(), usage)
