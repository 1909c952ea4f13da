"""Mixed batches: decode rows through a backend's decode path, the rest through its
extend path, must equal one extend over the whole batch by the fp32 reference
(the torch and Triton backends in fp32 on the CPU, the Triton interpreter there;
on a GPU also FlashAttention-2 in bf16)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from vtensor.models.attention import AttentionBackend, AttentionMetadata
from vtensor.models.attention_backends import FlashAttention2, TorchAttention, TritonAttention

from .kernel_cases import rel_err

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CASES: list[tuple[str, type[AttentionBackend], torch.dtype]] = [
    ("cpu", TorchAttention, torch.float32)
]
if os.environ.get("TRITON_INTERPRET") == "1":  # set by conftest on machines without a GPU
    CASES.append(("cpu", TritonAttention, torch.float32))
if torch.cuda.is_available():
    CASES += [("cuda", TorchAttention, torch.float32), ("cuda", TritonAttention, torch.float32)]
    CASES.append(("cuda", FlashAttention2, torch.bfloat16))  # FA2 has no fp32


@pytest.mark.parametrize("device,backend,dtype", CASES, ids=[f"{d}-{c.name}" for d, c, _ in CASES])
def test_mixed_batch_split_equals_one_extend(
    device: str, backend: type[AttentionBackend], dtype: torch.dtype
) -> None:
    hq, hkv, d, rows_per_slot = 4, 2, 32, 256
    n_dec, n_ext = random.randint(1, 5), random.randint(1, 3)
    prefix = [random.randint(1, 200) for _ in range(n_dec + n_ext)]
    new = [1] * n_dec + [random.randint(2, 40) for _ in range(n_ext)]
    slots = random.sample(range(8), n_dec + n_ext)
    k_cache = torch.randn(8 * rows_per_slot, hkv, d, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    total = sum(new)
    q, k, v = (torch.randn(total, h, d, device=device).to(dtype) for h in (hq, hkv, hkv))
    row_starts = [s * rows_per_slot for s in slots]
    store = [r + p + i for r, p, n in zip(row_starts, prefix, new) for i in range(n)]
    indptr = [0]
    for n in new:
        indptr.append(indptr[-1] + n)

    def ints(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    seq_lens = [p + n for p, n in zip(prefix, new)]
    base = dict(
        store_rows=ints(store), row_starts=ints(row_starts), prefix_lens=ints(prefix),
        seq_lens=ints(seq_lens), qo_indptr=ints(indptr), max_new=max(new),
        max_len=max(seq_lens), is_decode=False,
    )  # fmt: skip
    whole = TorchAttention([(k_cache, v_cache)]).forward(0, q, k, v, AttentionMetadata(**base))
    split = AttentionMetadata(
        **{**base, "max_new": max(new[n_dec:])},
        num_decode=n_dec,
        decode_max_len=max(seq_lens[:n_dec]),
        extend_qo_indptr=ints([p - n_dec for p in indptr[n_dec:]]),
    )
    mixed = backend([(k_cache, v_cache)]).forward(0, q, k, v, split)
    if dtype == torch.float32:
        torch.testing.assert_close(mixed, whole, rtol=2e-4, atol=2e-4)
    else:  # one bf16 rounding of the output apart, at most
        assert rel_err(mixed, whole) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_precompile_decode_runs_every_variant_on_triton(device: str) -> None:
    from vtensor.kernels.common import use_triton
    from vtensor.kernels.decode import PRECOMPILE_SPLITS, precompile_decode

    k = torch.randn(64, 2, 32, device=device, dtype=torch.bfloat16)
    ran = precompile_decode(4, k, torch.randn_like(k), row=random.randrange(64))
    # Triton on a GPU, or its interpreter on the CPU (as the tests run it); else nothing.
    assert ran == (len(PRECOMPILE_SPLITS) if use_triton(k[:1], k, impl="auto") else 0)
    assert precompile_decode(4, k, torch.randn_like(k), impl="torch") == 0
