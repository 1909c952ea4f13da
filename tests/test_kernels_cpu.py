"""Every kernel against its fp32 reference, tiny shapes (Triton interpreter on the CPU).

On a GPU machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import random

import pytest
import torch

from vtensor.kernels import decode_attention, extend_attention, store_kv
from vtensor.kernels.reference import decode_ref, extend_ref
from vtensor.kvcache import KVLayout

from .kernel_cases import TOLERANCE, ints, make_case, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GQA = [(4, 4), (8, 2), (8, 1)]  # ratios 1, 4, 8


def test_layout_strides_and_sizes() -> None:
    llama3 = KVLayout(num_slots=4, max_tokens=128, num_layers=32, num_kv_heads=8, head_dim=128)
    assert llama3.bytes_per_token == 128 * 1024
    assert llama3.tokens_per_chunk(2 << 20) == 16
    assert llama3.chunks_for_tokens(17, 2 << 20) == 2
    arena = llama3.allocate()
    assert arena.stride() == llama3.strides
    k, v = llama3.k_view(arena, 5), llama3.v_view(arena, 5)
    assert k.shape == (4 * 128, 8, 128) and k.stride() == (llama3.token_stride, 128, 1)
    k[130].fill_(1.0)
    v[130].fill_(2.0)
    assert bool((arena[1, 2, 5, 0] == 1).all()) and bool((arena[1, 2, 5, 1] == 2).all())
    with pytest.raises(ValueError):
        KVLayout(num_slots=0, max_tokens=1, num_layers=1, num_kv_heads=1, head_dim=64)
    with pytest.raises(IndexError):
        llama3.k_view(arena, 32)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_store_kv(kv_heads: int) -> None:
    case = make_case(3, 16, 4, kv_heads, 64, torch.bfloat16, DEVICE)
    before = case.arena.clone()
    n = 7
    rows = torch.tensor(random.sample(range(case.k.shape[0]), n), device=DEVICE)
    k = torch.randn(n, kv_heads, 64, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(n, kv_heads, 64, device=DEVICE).to(torch.bfloat16)
    store_kv(case.k, case.v, k, v, rows)
    assert torch.equal(case.k[rows], k) and torch.equal(case.v[rows], v)
    expect = before.clone()
    layout = case.layout
    store_kv(layout.k_view(expect, 1), layout.v_view(expect, 1), k, v, rows, impl="torch")
    assert torch.equal(case.arena, expect)  # nothing else in the arena moved


@pytest.mark.parametrize("q_heads,kv_heads", GQA)
@pytest.mark.parametrize("dim", [64, 128])
def test_decode_matches_reference(q_heads: int, kv_heads: int, dim: int) -> None:
    lengths = [1, 37, 64, 13]
    case = make_case(len(lengths), 64, q_heads, kv_heads, dim, torch.bfloat16, DEVICE)
    q = torch.randn(len(lengths), q_heads, dim, device=DEVICE).to(torch.bfloat16)
    lens = ints(lengths, DEVICE)
    out = decode_attention(q, case.k, case.v, case.row_starts(), lens, max(lengths))
    ref = decode_ref(q, case.k, case.v, case.row_starts(), lens, dim**-0.5)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_split_merge(splits: int) -> None:
    lengths = [100, 5, 128]  # the short request leaves most splits empty
    case = make_case(3, 128, 8, 2, 64, torch.float16, DEVICE)
    q = torch.randn(3, 8, 64, device=DEVICE).to(torch.float16)
    lens = ints(lengths, DEVICE)
    out = decode_attention(q, case.k, case.v, case.row_starts(), lens, 128, num_splits=splits)
    ref = decode_ref(q, case.k, case.v, case.row_starts(), lens, 64**-0.5)
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("q_heads,kv_heads", GQA)
@pytest.mark.parametrize("dim", [64, 128])
def test_extend_matches_reference(q_heads: int, kv_heads: int, dim: int) -> None:
    prefixes, news = [0, 5, 17, 30], [1, 7, 20, 2]
    case = make_case(len(news), 64, q_heads, kv_heads, dim, torch.bfloat16, DEVICE)
    indptr = ints([0, *torch.tensor(news).cumsum(0).tolist()], DEVICE)
    q = torch.randn(sum(news), q_heads, dim, device=DEVICE).to(torch.bfloat16)
    args = (q, case.k, case.v, indptr, case.row_starts(), ints(prefixes, DEVICE))
    out = extend_attention(*args, max(news))
    ref = extend_ref(*args, dim**-0.5)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


def test_torch_fallback_is_the_reference() -> None:
    case = make_case(2, 16, 4, 2, 64, torch.float16, DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE).to(torch.float16)
    lens = ints([3, 16], DEVICE)
    out = decode_attention(q, case.k, case.v, case.row_starts(), lens, 16, impl="torch")
    ref = decode_ref(q, case.k, case.v, case.row_starts(), lens, 64**-0.5)
    assert torch.equal(out, ref.half())


def test_wrappers_reject_bad_inputs() -> None:
    case = make_case(2, 16, 4, 2, 64, torch.bfloat16, DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE).to(torch.bfloat16)
    lens = ints([3, 4], DEVICE)
    with pytest.raises(ValueError, match="Hq a multiple"):
        decode_attention(q[:, :3], case.k, case.v, case.row_starts(), lens, 4)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q.half(), case.k, case.v, case.row_starts(), lens, 4)
    with pytest.raises(ValueError, match="length 2"):
        decode_attention(q, case.k, case.v, case.row_starts()[:1], lens, 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        decode_attention(q, case.k, case.v, case.row_starts().float(), lens, 4)
    with pytest.raises(ValueError, match="unit stride"):
        wide = torch.randn(2, 2, 128, device=DEVICE).to(torch.bfloat16)
        store_kv(case.k, case.v, wide[..., ::2], wide[..., ::2], ints([0, 1], DEVICE))
