"""The attention backends, and how an engine picks one (``--attention-backend``).

| name | class | decode / extend | CUDA graphs |
|---|---|---|---|
| ``triton`` | :class:`TritonAttention` | our split-K decode and extend kernels | yes |
| ``fa2`` | :class:`FlashAttention2` | torch's unmodified FlashAttention-2 varlen | yes |
| ``torch`` | :class:`TorchAttention` | the fp32 torch reference | no (host syncs) |

Every backend stores K/V with our ``store_kv`` or ``rope_store_kv`` (Triton, or
their references for ``torch``). The default (``None`` or ``"auto"``) is
``triton`` on CUDA and ``torch`` on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

import torch

from vtensor.kernels import (
    DecodeWorkspace,
    decode_attention,
    extend_attention,
    fa2_decode,
    fa2_extend,
)
from vtensor.kernels.decode import precompile_decode

from .attention import AttentionBackend


class _KernelWrapperAttention(AttentionBackend):
    """Decode and extend through our kernel wrappers (``vtensor.kernels``), which run
    either the Triton kernel or its fp32 torch reference: ``impl`` picks which."""

    impl: ClassVar[str]
    workspace: DecodeWorkspace | None = None  # split-K scratch, where the backend keeps one

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row_starts: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return decode_attention(
            q, k_cache, v_cache, row_starts, seq_lens, max_len,
            sm_scale=self.sm_scale, impl=self.impl, out=out, workspace=self.workspace,
        )  # fmt: skip

    def extend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        qo_indptr: torch.Tensor,
        row_starts: torch.Tensor,
        prefix_lens: torch.Tensor,
        max_new: int,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return extend_attention(
            q, k_cache, v_cache, qo_indptr, row_starts, prefix_lens, max_new,
            sm_scale=self.sm_scale, impl=self.impl, out=out,
        )  # fmt: skip


class TritonAttention(_KernelWrapperAttention):
    """Our Triton kernels on the strided layer views: split-K decode, extend.

    CUDA, or the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow,
    for tests; it must be set before vtensor is imported)."""

    name = "triton"
    impl = "triton"

    def __init__(
        self,
        kv_views: Sequence[tuple[torch.Tensor, torch.Tensor]],
        sm_scale: float | None = None,
        *,
        q_heads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        super().__init__(kv_views, sm_scale, q_heads=q_heads, max_batch=max_batch)
        if q_heads is not None and max_batch is not None and self.kv_views:
            # One split-K scratch for every layer and every decode graph: allocated here,
            # outside any capture, and never reallocated (graphs keep its addresses).
            k_cache = self.kv_views[0][0]
            self.workspace = DecodeWorkspace.for_batch(
                max_batch, q_heads, k_cache.shape[-1], k_cache.device
            )

    @classmethod
    def validate(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "attention backend 'triton' on the CPU needs TRITON_INTERPRET=1 (Triton's "
                "interpreter, slow: for tests); use --attention-backend torch on the CPU"
            )

    def precompile(self, q_heads: int, row: int) -> int:
        k_cache, v_cache = self.kv_views[0]  # every layer's view has the same strides
        return precompile_decode(
            q_heads, k_cache, v_cache, row, impl="triton", workspace=self.workspace
        )


class FlashAttention2(AttentionBackend):
    """torch's built-in FlashAttention-2 (``aten._flash_attention_forward``, varlen)
    reading the strided layer views as they are: ``cum_seq_k = row_starts`` and
    ``seqused_k = seq_lens`` (``vtensor.kernels.fa2``). CUDA (sm80+), bf16/fp16,
    head_dim up to 256 (a power of two, as for every vtensor kernel wrapper).

    Capturable for decode, going by torch's ``flash_api.cpp`` (and checked by
    ``tests/test_attention_backends_gpu.py``; set ``supports_cuda_graphs = False``
    to run it eagerly if a torch breaks that): the op reads lengths and starts
    from device tensors, makes no host sync, allocates through the caching
    allocator, and with no dropout draws no random state; its split-KV count and
    block ranges use the host ``max_k``, which the decode graphs fix to
    ``max_model_len`` (an upper bound of every later length, so replays stay exact)."""

    name = "fa2"

    @classmethod
    def validate(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
        if device.type != "cuda":
            raise ValueError(
                "attention backend 'fa2' needs CUDA (torch has no CPU FlashAttention); "
                "use --attention-backend torch on the CPU"
            )
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"attention backend 'fa2' needs bfloat16 or float16, got {dtype}; "
                "use --dtype bfloat16 or --attention-backend triton"
            )
        # FA2 takes multiples of 8 up to 256; our wrappers' shared checks want powers of two.
        if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
            raise ValueError(
                f"attention backend 'fa2' needs a power-of-two head_dim in [16, 256], "
                f"got {head_dim}"
            )
        if not torch.backends.cuda.is_flash_attention_available():
            raise ValueError(
                f"attention backend 'fa2': torch {torch.__version__} was built without "
                "FlashAttention"
            )
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise ValueError("attention backend 'fa2' needs an sm80 (Ampere) or newer GPU")

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row_starts: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        o = fa2_decode(q, k_cache, v_cache, row_starts, seq_lens, max_len, self.sm_scale)
        return o if out is None else out.copy_(o)  # torch's op takes no output buffer

    def extend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        qo_indptr: torch.Tensor,
        row_starts: torch.Tensor,
        prefix_lens: torch.Tensor,
        max_new: int,
        max_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        o = fa2_extend(
            q, k_cache, v_cache, qo_indptr, row_starts, prefix_lens, max_new, max_len,
            self.sm_scale,
        )  # fmt: skip
        return o if out is None else out.copy_(o)


class TorchAttention(_KernelWrapperAttention):
    """The fp32 torch reference (``vtensor.kernels.reference``) for store, decode and
    extend: any device and dtype, slow. It loops over requests with host ints
    (a sync per request), so it never runs in a CUDA graph."""

    name = "torch"
    impl = "torch"
    store_impl = "torch"
    supports_cuda_graphs = False


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (TritonAttention, FlashAttention2, TorchAttention)
}
AUTO = "auto"


def default_backend(device: torch.device) -> str:
    """Triton on CUDA; the fp32 reference on the CPU (the interpreter is for tests)."""
    return TritonAttention.name if device.type == "cuda" else TorchAttention.name


def select_backend(
    name: str | None, device: torch.device, dtype: torch.dtype, head_dim: int
) -> type[AttentionBackend]:
    """The backend class for ``name`` (``None``/``"auto"``: by device), validated for
    this device, dtype and head size; ``ValueError`` naming the backend otherwise."""
    if name is None or name == AUTO:
        name = default_backend(device)
    cls = ATTENTION_BACKENDS.get(name)
    if cls is None:
        known = ", ".join(ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}; known: {known} (or auto)")
    cls.validate(device, dtype, head_dim)
    return cls
