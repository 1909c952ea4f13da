"""Every kernel past 2^31 elements: 64-bit offsets on a sparsely mapped virtual arena.

A request's cache rows sit ``position × token_stride`` elements into its slot.
With a long context (Llama-3-8B past 32,767 tokens, MHA 32×32 past 8,191) that
product passes 2^31, and a kernel computing it in int32 reads out of bounds.
These tests build the same arithmetic cheaply: a layout with a huge token
stride (many layers), reserved whole in a ``VirtualTensor``, with only the
chunks that hold the layer under test mapped. Requests sit in slot 0 (the
*position* term overflows) and in a later slot (the row start is past 2^31
too); every output is checked against the fp32 reference.

On the CPU the kernels run in the Triton interpreter over the host backend;
on a GPU machine the same tests run the compiled kernels over CUDA VMM, plus
FA2 and the real Llama-3-8B / MHA shapes of the issue.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from vtensor.kernels import decode_attention, extend_attention, rope_store_kv, store_kv
from vtensor.kernels.reference import decode_ref, extend_ref, rope_ref
from vtensor.kvcache import KVLayout
from vtensor.memory import ChunkPool, NoCudaDriverError, PhysicalBackend, VirtualTensor
from vtensor.memory import open_backend as open_memory_backend

from .conftest import assert_pool_clean
from .kernel_cases import TOLERANCE, ints, rel_err

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INT32_LIMIT = 2**31


@dataclass
class SparseArena:
    """A layout reserved whole, with only some rows of one layer backed."""

    layout: KVLayout
    vt: VirtualTensor
    layer: int

    @property
    def k(self) -> torch.Tensor:
        return self.layout.k_view(self.tensor, self.layer)

    @property
    def v(self) -> torch.Tensor:
        return self.layout.v_view(self.tensor, self.layer)

    @property
    def tensor(self) -> torch.Tensor:
        return self.vt.view(self.layout.dtype, self.layout.shape, self.layout.strides)

    def back_rows(self, rows: range) -> None:
        """Map the chunks holding this layer's K and V of ``rows``, and fill them."""
        lay, size = self.layout, self.layout.itemsize
        for row in rows:
            offset = (row * lay.token_stride + self.layer * lay.layer_stride) * size
            self.vt.ensure_mapped(offset, lay.layer_stride * size)
        self.k[rows.start : rows.stop].normal_()
        self.v[rows.start : rows.stop].normal_()

    def element_offset(self, row: int) -> int:
        """Elements from the view's base to ``row`` (what a kernel multiplies out)."""
        return row * self.layout.token_stride


@pytest.fixture
def memory_backend() -> Iterator[PhysicalBackend]:
    try:
        backend = open_memory_backend("cuda" if ON_GPU else "host")
    except NoCudaDriverError as exc:  # a GPU torch without a usable driver
        pytest.skip(f"CUDA backend unavailable: {exc}")
    yield backend
    backend.close()


@pytest.fixture
def make_sparse(memory_backend: PhysicalBackend) -> Iterator[Callable[..., SparseArena]]:
    made: list[tuple[ChunkPool, VirtualTensor]] = []

    def make(layout: KVLayout, layer: int, capacity_chunks: int) -> SparseArena:
        pool = ChunkPool(memory_backend, capacity_chunks * memory_backend.chunk_size)
        vt = VirtualTensor(pool, layout.total_bytes)
        made.append((pool, vt))
        # Triton checks that a tensor argument's base address is mapped: back the first
        # chunk, as the engine's scratch slot does.
        vt.ensure_mapped(0, 1)
        return SparseArena(layout, vt, layer)

    yield make
    for pool, vt in made:
        vt.close()
        assert_pool_clean(pool)
        pool.close()


def tall_layout(dtype: torch.dtype, kv_heads: int = 2, head_dim: int = 16) -> KVLayout:
    """A token stride of 2^26 elements (2^20 layers): position 32 is 2^31 elements in.
    Two slots of 64 tokens: slot 1 starts 2^32 elements in."""
    layers = 2**26 // (2 * kv_heads * head_dim)
    return KVLayout(2, 64, layers, kv_heads, head_dim, dtype)


DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = TOLERANCE.get(DTYPE, 1e-4)


def _sparse(make_sparse: Callable[..., SparseArena]) -> SparseArena:
    lay = tall_layout(DTYPE)
    arena = make_sparse(lay, lay.num_layers - 1, capacity_chunks=4 * 64 + 8)
    for slot in (0, 1):
        start = lay.row_start(slot)
        arena.back_rows(range(start, start + lay.max_tokens))
    assert arena.element_offset(lay.row_start(0) + 63) > INT32_LIMIT
    assert arena.element_offset(lay.row_start(1)) >= 2 * INT32_LIMIT
    return arena


def test_layout_rejects_rows_past_int32() -> None:
    with pytest.raises(ValueError, match="row indices are int32"):
        KVLayout(2**16, 2**16, 1, 1, 16)
    KVLayout(2**15, 2**16 - 1, 1, 1, 16)  # just under the limit is fine


def test_store_kv_past_2_31(make_sparse: Callable[..., SparseArena]) -> None:
    arena = _sparse(make_sparse)
    lay = arena.layout
    rows = [lay.row_start(0) + p for p in (0, 31, 32, 63)] + [lay.row_start(1) + 63]
    k = torch.randn(len(rows), lay.num_kv_heads, lay.head_dim, device=DEVICE).to(DTYPE)
    v = torch.randn_like(k)
    store_kv(arena.k, arena.v, k, v, ints(rows, DEVICE))
    assert torch.equal(arena.k[rows], k) and torch.equal(arena.v[rows], v)


@pytest.mark.parametrize("q_heads", [2, 8])
def test_rope_store_past_2_31(make_sparse: Callable[..., SparseArena], q_heads: int) -> None:
    """Rotated k and plain v land at rows past 2^31 and 2^32 elements, and nowhere else."""
    arena = _sparse(make_sparse)
    lay = arena.layout
    rows = [lay.row_start(0) + p for p in (0, 31, 32, 63)] + [lay.row_start(1) + 63]
    hkv, dim = lay.num_kv_heads, lay.head_dim
    qkv = torch.randn(len(rows), (q_heads + 2 * hkv) * dim, device=DEVICE).to(DTYPE)
    angle = torch.rand(len(rows), 1, dim // 2, device=DEVICE) * 100
    cos, sin = angle.cos(), angle.sin()
    other = [lay.row_start(0) + p for p in (1, 33, 62)] + [lay.row_start(1) + 62]
    untouched = arena.k[other].clone(), arena.v[other].clone()
    q = rope_store_kv(qkv, cos, sin, arena.k, arena.v, ints(rows, DEVICE), q_heads)
    x = qkv.unflatten(-1, (-1, dim))
    rotated = rope_ref(x[:, : q_heads + hkv], cos, sin)
    assert rel_err(q, rotated[:, :q_heads]) < TOL
    assert rel_err(arena.k[rows], rotated[:, q_heads:]) < TOL
    assert torch.equal(arena.v[rows], x[:, q_heads + hkv :])
    assert torch.equal(arena.k[other], untouched[0]) and torch.equal(arena.v[other], untouched[1])


@pytest.mark.parametrize("q_heads", [2, 8])  # MHA and GQA 4
def test_decode_past_2_31(make_sparse: Callable[..., SparseArena], q_heads: int) -> None:
    arena = _sparse(make_sparse)
    lay = arena.layout
    starts = ints([lay.row_start(0), lay.row_start(1)], DEVICE)
    lens = ints([64, random.randint(33, 64)], DEVICE)
    q = torch.randn(2, q_heads, lay.head_dim, device=DEVICE).to(DTYPE)
    ref = decode_ref(q, arena.k, arena.v, starts, lens, lay.head_dim**-0.5)
    for splits in (None, 1, 3):  # one split reads every row in one program
        out = decode_attention(q, arena.k, arena.v, starts, lens, 64, num_splits=splits)
        assert rel_err(out, ref) < TOL, splits


@pytest.mark.parametrize("q_heads", [2, 8])
def test_extend_past_2_31(make_sparse: Callable[..., SparseArena], q_heads: int) -> None:
    """The issue's crash: keys at positions whose offset passes 2^31 (prefix 40, 24 new)."""
    arena = _sparse(make_sparse)
    lay = arena.layout
    prefixes, news = [40, random.randint(33, 50)], [24, 64 - 50]
    indptr = ints([0, news[0], sum(news)], DEVICE)
    starts = ints([lay.row_start(0), lay.row_start(1)], DEVICE)
    q = torch.randn(sum(news), q_heads, lay.head_dim, device=DEVICE).to(DTYPE)
    args = (q, arena.k, arena.v, indptr, starts, ints(prefixes, DEVICE))
    ref = extend_ref(*args, lay.head_dim**-0.5)
    out = extend_attention(*args, max(news), out=torch.full_like(q, float("nan")))
    assert rel_err(out, ref) < TOL


# ----------------------------------------------------------- GPU: the real shapes
REAL_SHAPES = [  # (layers, q_heads, kv_heads, prefix): both cross 2^31 elements in
    (32, 32, 8, 33_000),  # Llama-3.1-8B: crashed past 32,767 tokens
    (32, 32, 32, 16_384),  # MHA 32 layers x 32 heads: crashed past 8,191
]


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (real shapes map GiBs)")
@pytest.mark.parametrize("layers,q_heads,kv_heads,prefix", REAL_SHAPES)
def test_real_shapes_past_2_31(
    make_sparse: Callable[..., SparseArena], layers: int, q_heads: int, kv_heads: int, prefix: int
) -> None:
    """The issue's failing cases, one request per slot 1 with its whole context mapped:
    rope_store_kv writes the new tokens' K/V past 2^31 elements, then extend (new tokens
    behind a long prefix), decode and FA2 against fp32 references."""
    from vtensor.kernels import fa2_decode, fa2_extend

    new, dim = 200, 128
    total = prefix + new
    lay = KVLayout(3, total + 512, layers, kv_heads, dim, torch.bfloat16)
    per_token = lay.bytes_per_token
    arena = make_sparse(lay, layers - 1, capacity_chunks=(total * per_token >> 21) + 64)
    start = lay.row_start(1)
    arena.vt.ensure_mapped(start * per_token, total * per_token)
    arena.k[start : start + total].normal_()
    arena.v[start : start + total].normal_()
    assert (total - 1) * lay.token_stride > INT32_LIMIT

    starts, scale = ints([start], "cuda"), dim**-0.5
    q = _rope_store_new_tokens(arena, q_heads, start + prefix, new)
    args = (q, arena.k, arena.v, ints([0, new], "cuda"), starts, ints([prefix], "cuda"))
    ref = extend_ref(*args, scale)
    assert rel_err(extend_attention(*args, new), ref) < TOLERANCE[torch.bfloat16]
    assert rel_err(fa2_extend(*args, new, total), ref) < TOLERANCE[torch.bfloat16]

    qd, lens = q[-1:].contiguous(), ints([total], "cuda")
    ref_d = decode_ref(qd, arena.k, arena.v, starts, lens, scale)
    assert rel_err(decode_attention(qd, arena.k, arena.v, starts, lens, total), ref_d) < 1e-2
    assert rel_err(fa2_decode(qd, arena.k, arena.v, starts, lens, total), ref_d) < 1e-2


def _rope_store_new_tokens(arena: SparseArena, q_heads: int, row: int, new: int) -> torch.Tensor:
    """Rotate and store ``new`` random tokens' K/V at rows ``row + [0, new)``; check them
    against ``rope_ref``; return their rotated q."""
    hkv, dim = arena.layout.num_kv_heads, arena.layout.head_dim
    qkv = torch.randn(new, (q_heads + 2 * hkv) * dim, device="cuda", dtype=torch.bfloat16)
    angle = torch.rand(new, 1, dim // 2, device="cuda") * 1000
    cos, sin = angle.cos(), angle.sin()
    rows = torch.arange(row, row + new, device="cuda", dtype=torch.int32)
    q = rope_store_kv(qkv, cos, sin, arena.k, arena.v, rows, q_heads)
    x = qkv.unflatten(-1, (-1, dim))
    rotated = rope_ref(x[:, : q_heads + hkv], cos, sin)
    assert rel_err(q, rotated[:, :q_heads]) < TOLERANCE[torch.bfloat16]
    assert rel_err(arena.k[row : row + new], rotated[:, q_heads:]) < TOLERANCE[torch.bfloat16]
    assert torch.equal(arena.v[row : row + new], x[:, q_heads + hkv :])
    return q
