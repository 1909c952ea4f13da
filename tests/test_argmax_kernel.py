"""The greedy argmax against ``torch.argmax`` exactly: ties, NaN, signed zeros,
infinities, maxima at the first/last index and at block and split boundaries.

On the CPU the kernel runs in the Triton interpreter (tiny vocabularies, small blocks
so a row takes several blocks and splits); on a GPU the same tests run the compiled
kernel (``test_silu_argmax_gpu.py`` adds Llama-3's 128256 and CUDA graphs).
"""

from __future__ import annotations

import random

import pytest
import torch

from vtensor.kernels.argmax import (
    MAX_SPLITS,
    ArgmaxConfig,
    _num_sms,
    _partials,
    argmax,
    choose_splits,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Bits of a NaN with the sign bit set (conversions from fp32 drop a NaN's sign).
NEGATIVE_NAN = {torch.bfloat16: -64, torch.float16: -512, torch.float32: -4194304}
SMALL = [  # several blocks a split, one block a split, one split a row
    ArgmaxConfig(block=32, num_warps=1, programs_per_sm=2),
    ArgmaxConfig(block=64, num_warps=1, programs_per_sm=64, stages=2),
    ArgmaxConfig(block=32, num_warps=1, programs_per_sm=1),
    ArgmaxConfig(),
]


def assert_like_torch(logits: torch.Tensor, config: ArgmaxConfig | None = None) -> None:
    got, want = argmax(logits, config), logits.argmax(dim=-1)
    assert got.dtype == torch.int64 and got.device == logits.device
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def boundaries(vocab: int, batch: int, cfg: ArgmaxConfig) -> list[int]:
    """Indices on either side of every block and split boundary of a row, and the ends."""
    splits, per = choose_splits(batch, vocab, _num_sms(torch.device(DEVICE)), cfg)
    edges = {0, vocab - 1}
    for b in range(1, -(-vocab // cfg.block)):
        edges |= {b * cfg.block - 1, b * cfg.block}
    for s in range(1, splits):
        edges |= {s * per * cfg.block - 1, s * per * cfg.block}
    return sorted(i for i in edges if 0 <= i < vocab)


@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: f"b{c.block}p{c.programs_per_sm}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_rows(cfg: ArgmaxConfig, dtype: torch.dtype) -> None:
    for vocab in (1, 31, 32, 33, random.randint(100, 700)):
        batch = random.randint(1, 6)
        assert_like_torch(torch.randn(batch, vocab, device=DEVICE).to(dtype), cfg)


@pytest.mark.parametrize("cfg", SMALL[:3], ids=lambda c: f"b{c.block}p{c.programs_per_sm}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_ties_at_every_boundary(cfg: ArgmaxConfig, dtype: torch.dtype) -> None:
    """Row pairs: the maximum alone at a boundary index, then tied at it and at a later
    index (the first must win): the next boundary, or one block on (the same lane of the
    next block), over values that tie a lot (small integers)."""
    vocab, batch = random.randint(120, 220), 2
    edges = boundaries(vocab, batch, cfg)
    pairs = [*zip(edges, [*edges[1:], vocab - 1])]
    pairs += [(i, i + cfg.block) for i in edges if i + cfg.block < vocab]
    for i, j in pairs:
        x = torch.randint(-20, 20, (batch, vocab), device=DEVICE).to(dtype)
        x[0, i] = 50
        x[1, i] = x[1, j] = 50
        assert_like_torch(x, cfg)
        assert argmax(x, cfg)[1] == min(i, j)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype: torch.dtype) -> None:
    """Each row a case torch decides in a particular way; our kernel must agree."""
    cfg, v = SMALL[0], 150
    nan, inf = float("nan"), float("inf")
    x = torch.randn(10, v, device=DEVICE).to(dtype) - 10  # all negative
    x[0] = -inf  # all -inf: index 0
    x[1, 70] = inf  # one +inf
    x[2, [40, 90]] = inf  # two: the first
    x[3, [100, 20]] = nan  # NaN beats all: the first NaN
    x[4, 5], x[4, 130] = inf, nan  # NaN beats +inf
    ints = x.view({4: torch.int32, 2: torch.int16}[x.element_size()])
    ints[5, 64] = NEGATIVE_NAN[dtype]  # a NaN with its sign bit set is a NaN too
    x[6, 33], x[6, 97] = -0.0, 0.0  # -0.0 == +0.0: the first
    x[7, 33], x[7, 97] = 0.0, -0.0
    x[8] = 3.0  # all equal: index 0
    x[9, v - 1] = 1.0  # the last index
    assert bool(x[5, 64].isnan()) and int(ints[5, 64]) < 0
    assert_like_torch(x, cfg)
    assert argmax(x, cfg).tolist() == [0, 70, 40, 20, 130, 64, 33, 33, 0, v - 1]


def test_largest_finite_values_and_subnormals() -> None:
    x = torch.zeros(3, 90, device=DEVICE)
    x[0, 10], x[0, 80] = torch.finfo(torch.float32).max, float("inf")
    x[1].fill_(-1.0)
    x[1, 30], x[1, 60] = 1.4e-45, 2.9e-45  # subnormals (1 and 2 units): the larger
    x[2].fill_(-1e-45)
    x[2, 50] = -0.0  # a negative subnormal is below zero
    assert_like_torch(x, SMALL[0])
    assert argmax(x, SMALL[0]).tolist() == [80, 60, 50]


def test_strided_rows_and_views() -> None:
    """A row stride larger than V (a column slice) and a row slice of a larger batch."""
    base = torch.randn(7, 300, device=DEVICE).to(torch.bfloat16)
    assert_like_torch(base[:, 50:250], SMALL[0])
    assert_like_torch(base[2:5], SMALL[1])


def test_empty_batch_and_the_reference_path() -> None:
    out = argmax(torch.empty(0, 10, device=DEVICE))
    assert out.shape == (0,) and out.dtype == torch.int64
    x = torch.randn(3, 40, device=DEVICE)
    assert torch.equal(argmax(x, impl="torch"), x.argmax(-1))


def test_bad_input_is_refused() -> None:
    for x, exc, msg in [
        (torch.randn(10, device=DEVICE), ValueError, "B, V"),
        (torch.randn(2, 3, 4, device=DEVICE), ValueError, "B, V"),
        (torch.randint(0, 9, (2, 8), device=DEVICE), TypeError, "one of"),
        (torch.empty(2, 0, device=DEVICE), ValueError, "V=0"),
        (torch.randn(8, 2, device=DEVICE).t(), ValueError, "unit stride"),
    ]:
        with pytest.raises(exc, match=msg):
            argmax(x)
    with pytest.raises(ValueError, match="impl"):
        argmax(torch.randn(2, 8, device=DEVICE), impl="gpu")
    for kw in ({"block": 48}, {"num_warps": 3}, {"block": 32, "num_warps": 2}, {"stages": 0},
               {"programs_per_sm": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            ArgmaxConfig(**kw)


def test_splits_cover_the_row_and_none_is_empty() -> None:
    cfg = ArgmaxConfig()
    for batch in (1, 2, 16, 100, 256, 5000):
        for vocab in (1, 4095, 4096, 4097, 32000, 128256, 152064, 10**7):
            splits, per = choose_splits(batch, vocab, 132, cfg)
            blocks = -(-vocab // cfg.block)
            assert 1 <= splits <= MAX_SPLITS and per >= 1
            assert (splits - 1) * per < blocks <= splits * per  # covered, last split nonempty
    # Llama-3's vocabulary on 132 SMs: batch 1 spreads over every block; 256 splits less.
    assert choose_splits(1, 128256, 132, cfg) == (32, 1)
    assert choose_splits(256, 128256, 132, cfg)[0] < 32


def test_partials_are_cached_and_never_reallocated() -> None:
    """The graph-safety invariant: one buffer per (device, stream, batch, splits)."""
    cfg = SMALL[0]
    x = torch.randn(3, 200, device=DEVICE)
    argmax(x, cfg)
    keys = {k for k in _partials if k[0] == x.device and k[2] == 3}
    ptrs = {k: _partials[k].data_ptr() for k in keys}
    assert keys
    for _ in range(3):
        assert_like_torch(torch.randn(3, 200, device=DEVICE), cfg)
    assert {k: _partials[k].data_ptr() for k in keys} == ptrs
