"""Decode's per-request splits and its reused split-K workspace.

Tiny shapes: on the CPU the kernels run in the Triton interpreter; on a GPU
machine the same tests run the compiled kernels (CUDA graph replay:
test_kernels_gpu).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import vtensor.kernels.decode_config as decode_config_module
from vtensor.kernels import DecodeWorkspace, decode_attention
from vtensor.kernels.decode import MAX_GRID_BATCH
from vtensor.kernels.decode_config import DecodeConfig, choose_num_splits, default_config
from vtensor.kernels.reference import decode_ref
from vtensor.kernels.splitk import BALANCE_WAVES, MAX_WAVES, NO_BALANCE, num_sms, used_splits

from .kernel_cases import TOLERANCE, Case, ints, make_case, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H100_SMS = 132


def _run(
    case: Case, q: torch.Tensor, lens: torch.Tensor, max_len: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, fp32 reference)."""
    out = decode_attention(q, case.k, case.v, case.row_starts(), lens, max_len, **kw)
    ref = decode_ref(q, case.k, case.v, case.row_starts(), lens, q.shape[-1] ** -0.5)
    return out, ref


@pytest.mark.parametrize("min_split", [16, 40, 64])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_short_requests_under_a_long_bound(min_split: int, splits: int) -> None:
    """A decode graph passes max_len = max_model_len: each request divides its own
    length among the splits (fp32, so a misplaced split boundary cannot hide in bf16
    rounding). Lengths straddle every boundary a split of 16/40/64 tokens makes."""
    lengths = [1, 15, 16, 17, random.randint(18, 128), 128]
    case = make_case(len(lengths), 128, 8, 2, 32, torch.float32, DEVICE)
    q = torch.randn(len(lengths), 8, 32, device=DEVICE)
    cfg = DecodeConfig(block_n=16, min_split=min_split, balance=False)
    out, ref = _run(case, q, ints(lengths, DEVICE), 1 << 20, num_splits=splits, config=cfg)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("balance", [True, False])
def test_a_long_request_among_short_ones(balance: bool) -> None:
    """The device balance gives short requests one split (written directly) and the
    long one several (partials, merged by the last split), in one launch; the same
    answer with the balance off (every request split by num_splits alone)."""
    lengths = [random.randint(1, 24) for _ in range(5)] + [random.randint(300, 400)]
    random.shuffle(lengths)
    case = make_case(len(lengths), 400, 8, 2, 32, torch.float32, DEVICE)
    q = torch.randn(len(lengths), 8, 32, device=DEVICE)
    cfg = DecodeConfig(block_n=16, min_split=16, balance=balance)
    ws = DecodeWorkspace(8, 32, len(lengths) * 8, DEVICE)  # room for 8 splits each
    balance_programs = BALANCE_WAVES * num_sms(torch.device(DEVICE)) if balance else NO_BALANCE
    used = [
        used_splits(n, sum(lengths), 8, 16, balance_programs, 2, 16) for n in lengths
    ]  # the host mirror of the kernel's split rule
    assert max(used) > 1 and (min(used) == 1 or not balance)
    for _ in "ab":  # twice: the tickets went back to 0 after the first call
        ws.mid_lse.fill_(float("nan"))
        out, ref = _run(
            case, q, ints(lengths, DEVICE), 1 << 20, num_splits=8, config=cfg, workspace=ws
        )
        assert rel_err(out, ref) < 1e-5
        assert not ws.tickets.any()
        lse = ws.views(len(lengths), 8).mid_lse
        for b, u in enumerate(used):  # partials exactly where the mirror says splits run
            written = ~torch.isnan(lse[b, 0])
            assert written.tolist() == ([True] * u + [False] * (8 - u) if u > 1 else [False] * 8)


def test_bf16_with_the_default_config() -> None:
    lengths = [random.randint(1, 256) for _ in range(3)] + [256]
    case = make_case(len(lengths), 256, 8, 2, 64, torch.bfloat16, DEVICE)
    q = torch.randn(len(lengths), 8, 64, device=DEVICE).to(torch.bfloat16)
    out, ref = _run(case, q, ints(lengths, DEVICE), 32768)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


def test_workspace_capacity_covers_every_automatic_split() -> None:
    ws_batch = 256
    capacity = ws_batch + MAX_WAVES * H100_SMS  # what DecodeWorkspace.for_batch sizes
    for batch in range(1, ws_batch + 1):
        for kv_heads in (1, 4, 8, 32):
            for max_len in (1, 1000, 131072):
                assert batch * choose_num_splits(batch, kv_heads, max_len, H100_SMS) <= capacity


def test_workspace_is_reused_and_matches_fresh_scratch() -> None:
    lengths = [5, 64, 33]
    case = make_case(3, 64, 8, 2, 64, torch.float32, DEVICE)
    q = torch.randn(3, 8, 64, device=DEVICE)
    lens = ints(lengths, DEVICE)
    ws = DecodeWorkspace.for_batch(4, 8, 64, DEVICE)
    ptrs = (ws.mid_o.data_ptr(), ws.mid_lse.data_ptr())
    ws.mid_o.fill_(float("nan"))  # stale scratch must never leak into an output
    ws.mid_lse.fill_(float("nan"))
    cfg = DecodeConfig(block_n=16, min_split=16, balance=False)  # 64 and 33 tokens split
    fresh, _ = _run(case, q, lens, 64, num_splits=3, config=cfg)
    outs = [_run(case, q, lens, 64, num_splits=3, config=cfg, workspace=ws)[0] for _ in "ab"]
    assert torch.equal(outs[0], fresh) and torch.equal(outs[1], fresh)
    views = ws.views(3, 3)  # what the calls used: the buffers' start
    assert (views.mid_o.data_ptr(), views.mid_lse.data_ptr()) == ptrs
    assert (ws.mid_o.data_ptr(), ws.mid_lse.data_ptr()) == ptrs
    # Split 0 of the split requests was written through the views (the 5-token one is
    # one split, written straight to the output).
    assert not torch.isnan(views.mid_lse[1:, :, 0]).any()
    assert ws.views(3, 3) is views  # views are cached, not rebuilt per call
    assert not ws.tickets.any()  # every merge put its ticket counter back


def test_workspace_too_small_or_mismatched() -> None:
    case = make_case(2, 32, 4, 2, 32, torch.float32, DEVICE)
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = ints([32, 9], DEVICE)
    small = DecodeWorkspace(4, 32, capacity=3, device=DEVICE)
    assert not small.fits(2, 2)
    with pytest.raises(ValueError, match="holds 3"):
        small.views(2, 2)
    cfg = DecodeConfig(block_n=16, min_split=16)
    out, ref = _run(case, q, lens, 32, num_splits=2, config=cfg, workspace=small)  # falls back
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="workspace is for 8 heads"):
        _run(case, q, lens, 32, workspace=DecodeWorkspace(8, 32, 16, DEVICE))


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DecodeConfig(block_n=48)
    with pytest.raises(ValueError, match="min_split"):
        DecodeConfig(min_split=0)
    assert DecodeConfig().name == "n64-w4-s3-m64"


def test_a_batch_over_the_grid_limit_is_refused() -> None:
    """The batch is the grid's y dimension (KV heads vary fastest), which CUDA bounds."""
    batch = MAX_GRID_BATCH + 1
    kv = torch.randn(4, 1, 16, device=DEVICE)
    q = torch.randn(batch, 1, 16, device=DEVICE)
    rows = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="over 65535"):
        decode_attention(q, kv, kv, rows, rows + 1, 4, impl="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_split_writes_the_output_directly(dtype: torch.dtype) -> None:
    """With one split the kernel stores the final output itself (no merge): into a view
    of a larger buffer (the mixed step's decode rows) without touching the rows around
    it, and without writing the split-K scratch."""
    lengths = [random.randint(1, 96) for _ in range(3)] + [96]
    batch = len(lengths)
    case = make_case(batch, 96, 8, 2, 32, dtype, DEVICE)
    q = torch.randn(batch, 8, 32, device=DEVICE).to(dtype)
    big = torch.full((batch + 2, 8, 32), float("nan"), dtype=dtype, device=DEVICE)
    ws = DecodeWorkspace.for_batch(batch, 8, 32, DEVICE)
    ws.mid_o.fill_(float("nan"))
    cfg = DecodeConfig(block_n=16, min_split=16)
    out, ref = _run(
        case, q, ints(lengths, DEVICE), 96, num_splits=1, config=cfg, out=big[1:-1], workspace=ws
    )
    assert out.data_ptr() == big[1].data_ptr()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else TOLERANCE[dtype])
    assert torch.isnan(big[0]).all() and torch.isnan(big[-1]).all()
    assert torch.isnan(ws.mid_o).all()  # no scratch: the one split's result is final


def test_default_config_at_both_pipeline_depths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper's own launch choice (two stages from DEEP_PIPELINE_BELOW_PAIRS request
    × KV-head pairs, three below) is right on both sides of it (the bound lowered to 16
    here: the interpreter runs a program at a time)."""
    monkeypatch.setattr(decode_config_module, "DEEP_PIPELINE_BELOW_PAIRS", 16)
    for batch in (3, 9):  # 6 and 18 pairs of 2 KV heads
        lengths = [random.randint(1, 40) for _ in range(batch)]
        case = make_case(batch, 40, 4, 2, 32, torch.bfloat16, DEVICE)
        q = torch.randn(batch, 4, 32, device=DEVICE).to(torch.bfloat16)
        assert default_config(32, batch, 2).num_stages == (3 if batch * 2 < 16 else 2)
        out, ref = _run(case, q, ints(lengths, DEVICE), 64)
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
