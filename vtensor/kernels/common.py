"""Checks shared by the kernel wrappers."""

from __future__ import annotations

import os

import torch

KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Per-request index arrays (int32 rows, lengths, offsets) that kernels read one scalar at
# a time. Triton would otherwise compile a variant per 16-byte alignment of each pointer,
# and the engine passes slices of one packed metadata buffer whose offsets move with the
# batch: a new alignment mid-serving is a compile (about 0.5 s) on some user's TTFT.
# Scalar loads gain nothing from the alignment, so it is not specialized on.
INDEX_POINTERS = ["Rows", "RowStart", "Lens", "PrefixLens", "QoIndptr"]

# Kernels run softmax in base 2 (exp2 is one instruction): logits are pre-scaled by log2(e).
LOG2E = 1.4426950408889634


def use_triton(*tensors: torch.Tensor, impl: str) -> bool:
    """Whether to run the Triton kernel (else the fp32 torch reference).

    ``impl="auto"`` picks Triton on CUDA tensors, and on CPU tensors only
    under ``TRITON_INTERPRET=1`` (the interpreter, used by the CPU tests).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl != "auto":
        return impl == "triton"
    return all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """A layer's K/V views: ``[rows, kv_heads, head_dim]``, unit last stride."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"K/V caches must both be [rows, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_DTYPES:
        raise TypeError(f"K/V cache dtypes must match and be one of {KV_DTYPES}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("K/V caches need a unit stride in head_dim")
    if k_cache.device != v_cache.device:
        raise ValueError("K/V caches must be on one device")
    head_dim = k_cache.shape[2]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    return k_cache.shape[1], head_dim


def check_index(t: torch.Tensor, name: str, n: int, device: torch.device) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_f32() -> bool:
    """Upcast dot operands to fp32 in the Triton interpreter only.

    The CPU interpreter (Triton 3.9) computes ``tl.dot`` of bf16 operands
    wrongly (values ~1e10 for a 16x16 product of N(0,1) inputs), while fp32
    dots are right. Compiled GPU kernels keep bf16/fp16 tensor-core dots.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact IEEE for fp32 caches (a user who picks fp32 wants fp32,
    and the HF-exact tests rely on it); Triton ignores it for bf16/fp16 operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The caller's output buffer (same shape/dtype/device as ``q``), or a new one."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    if out.stride(-1) != 1:
        raise ValueError("out needs a unit last stride")
    return out


def check_query(q: torch.Tensor, kv_heads: int, dim: int, dtype: torch.dtype, rows: str) -> None:
    """``q [rows, Hq, dim]`` with ``Hq`` a multiple of ``kv_heads``, the cache dtype."""
    if q.dim() != 3 or q.shape[2] != dim or q.shape[1] % kv_heads:
        raise ValueError(
            f"q must be [{rows}, Hq, {dim}] with Hq a multiple of {kv_heads}, got {tuple(q.shape)}"
        )
    if q.dtype != dtype or q.stride(-1) != 1:
        raise ValueError("q must match the cache dtype and have a unit last stride")


def check_decode_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[int, int]:
    """Validate a decode call (Triton or FA2); returns ``(kv_heads, head_dim)``."""
    kv_heads, dim = check_kv_cache(k_cache, v_cache)
    check_query(q, kv_heads, dim, k_cache.dtype, "B")
    check_index(row_starts, "row_starts", q.shape[0], q.device)
    check_index(lengths, "lengths", q.shape[0], q.device)
    return kv_heads, dim


def check_extend_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    row_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
) -> tuple[int, int]:
    """Validate an extend call (Triton or FA2); returns ``(kv_heads, head_dim)``."""
    kv_heads, dim = check_kv_cache(k_cache, v_cache)
    check_query(q, kv_heads, dim, k_cache.dtype, "T")
    batch = row_starts.shape[0]
    check_index(qo_indptr, "qo_indptr", batch + 1, q.device)
    check_index(row_starts, "row_starts", batch, q.device)
    check_index(prefix_lens, "prefix_lens", batch, q.device)
    return kv_heads, dim


def resolve_scale(sm_scale: float | None, dim: int) -> float:
    """The softmax scale: the caller's, else ``1/sqrt(head_dim)``."""
    return sm_scale if sm_scale is not None else dim**-0.5
