"""fp32 torch references for every kernel: the tests' ground truth and the CPU path."""

from __future__ import annotations

import torch


def store_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    k_cache[rows.long()] = k.to(k_cache.dtype)
    v_cache[rows.long()] = v.to(v_cache.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` over ``x [T, heads, D]``, cos/sin ``[T, 1,
    D/2]`` cast to ``x``'s dtype first: ``models.fused.rotate``'s math, op for op (not
    fp32: the CPU model path must stay bitwise what it was)."""
    cos, sin = torch.cat((cos, cos), -1).to(x.dtype), torch.cat((sin, sin), -1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_store_kv_ref(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    q_heads: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``rope_store_kv`` as ``rope_ref`` over q and k heads, then ``store_kv_ref``."""
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    split = (q_heads + kv_heads) * dim
    qk = rope_ref(qkv[:, :split].unflatten(-1, (q_heads + kv_heads, dim)), cos, sin)
    v = qkv[:, split:].unflatten(-1, (kv_heads, dim))
    store_kv_ref(k_cache, v_cache, qk[:, q_heads:], v, rows)
    return out.copy_(qk[:, :q_heads])


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """q ``[n, Hq, D]``, k/v ``[L, Hkv, D]`` -> ``[n, Hq, D]`` in fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), v)


def decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_starts: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        r, n = int(row_starts[b]), int(lengths[b])
        out[b] = _attend(q[b : b + 1], k_cache[r : r + n], v_cache[r : r + n], sm_scale, None)[0]
    return out


def extend_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    row_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(row_starts.shape[0]):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        r, p, n = int(row_starts[b]), int(prefix_lens[b]), q1 - q0
        if n == 0:
            continue
        qpos = p + torch.arange(n, device=q.device)
        kpos = torch.arange(p + n, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        out[q0:q1] = _attend(
            q[q0:q1], k_cache[r : r + p + n], v_cache[r : r + p + n], sm_scale, mask
        )
    return out


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in fp32 (the GEMV's reference)."""
    return x.float() @ weight.float().T


def linear_error_bound(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on ``|y - linear_ref(x, W)|`` for a ``y`` summed in fp32 (any
    order, any split) and rounded once to ``dtype``: the rounding, ``u·|ref|`` with
    ``u`` the unit roundoff (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), plus the worst case
    of two fp32 sums of ``K`` products (ours and the reference's), ``2·K·2^-24·(|x|
    @ |W|^T)``, with a factor 2 of slack on each."""
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    ref = linear_ref(x, weight)
    sums = x.float().abs() @ weight.float().abs().T
    return 2 * unit * ref.abs() + 4 * x.shape[1] * 2.0**-24 * sums


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 for ``gate_up [..., 2I]`` (gate first): SiLU·mul's
    reference, before its one rounding to the output dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
