"""The KV side of building an engine: the pool's budget, the arena and its scratch slot,
the KV manager over it, and the prefix cache that fits its geometry."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from vtensor.distributed import TPGroup
from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.host_tier import HostTier
from vtensor.kvcache.idle_policy import default_watermark
from vtensor.kvcache.layout import MAX_ROWS, KVLayout
from vtensor.kvcache.manager import KVCacheManager, KVGeometry
from vtensor.kvcache.prefix_cache import NoPrefixCache, PrefixCache
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.kvcache.radix_spill import SpillRadixCache
from vtensor.memory import ChunkPool, open_backend
from vtensor.models.config import ModelConfig

from .config import EngineConfig
from .offload_setup import step_workspace_bytes

if TYPE_CHECKING:
    from .setup import EngineRuntime

CPU_KV_BYTES = 256 << 20
CPU_CHUNK = 64 << 10  # small host chunks: tiny models still take several per request
# The scratch slot takes CUDA graphs' padding rows and is mapped for good. It must be
# slot 0: every layer view's base pointer lies in its first token, and Triton rejects a
# kernel argument whose base address is not mapped.
SCRATCH_SLOT = 0


def kv_budget(config: EngineConfig, rt: EngineRuntime, cfg: ModelConfig) -> int:
    """Bytes for the KV pool: the user's figure, else what the device can spare."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if rt.device.type == "cpu":
        return CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(rt.device)
    # Room for activations of the largest step and the logits of a full decode batch,
    # plus CUDA graph pools. A unified pool takes the workspace's room too: its planner
    # leaves each step's need of it to the workspace (engine/elastic.py).
    workspace = 0
    if not config.unified_memory_pool:
        workspace = step_workspace_bytes(config, cfg, rt.dtype.itemsize)
    spare = free - (1 - config.gpu_memory_utilization) * total - workspace - (1 << 30)
    if spare <= 0:
        raise MemoryError(
            f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free after weights)"
        )
    return int(spare)


def build_arena(
    config: EngineConfig,
    rt: EngineRuntime,
    cfg: ModelConfig,
    kv_heads: int | None = None,
    group: TPGroup | None = None,
) -> tuple[KVArena, ChunkPool]:
    """The arena has one slot per schedulable request, plus a scratch slot for graph padding.

    ``kv_heads``: the KV heads this rank holds (default: all of the model's). With a
    group, every rank's pool gets the smallest rank's budget, so that every arena can
    map whatever rank 0's books allow."""
    kv_heads = kv_heads or cfg.num_kv_heads
    group = group or TPGroup()
    if rt.device.type == "cuda":
        backend = open_backend("cuda", device=rt.device.index or 0)
    else:
        backend = open_backend("host", chunk_size=config.chunk_size or CPU_CHUNK)
    bytes_per_token = 2 * cfg.num_layers * kv_heads * cfg.head_dim * rt.dtype.itemsize
    max_tokens = KVGeometry.aligned_max_tokens(
        rt.max_model_len, bytes_per_token, backend.chunk_size
    )
    seats = config.max_num_seqs + 1  # and the scratch slot
    spare = spare_slots(config.max_num_seqs, max_tokens, config.enable_prefix_caching)
    layout = KVLayout(
        seats + spare,
        max_tokens,
        cfg.num_layers,
        kv_heads,
        cfg.head_dim,
        rt.dtype,
    )
    pool = ChunkPool(backend, group.min_int(kv_budget(config, rt, cfg)))
    return KVArena(layout, pool, rt.device), pool


SPARE_SLOTS = 32  # at most; benchmarks/mapping_sim.py needed 8 at 1024-token prompts, 32 at 256


def spare_slots(max_num_seqs: int, max_tokens: int, caching: bool) -> int:
    """Idle slots beyond one per seat, with prefix caching (address space only).

    A finished request's slot keeps mapping its cached blocks. With every seat taken,
    a new request would take such a slot, unmap the blocks and map fresh chunks in the
    step that admits it, on the critical path (``benchmarks/mapping_sim.py``); a spare
    slot is mapped ahead instead (``map_ahead.premap_waiting``) while the GPU computes.
    Fewer where the cache rows (int32: ``MAX_ROWS``) would not hold them."""
    if not caching:
        return 0
    room = MAX_ROWS // max_tokens - (max_num_seqs + 1)
    return max(0, min(SPARE_SLOTS, max_num_seqs, room))


def prefix_cache_for(
    geo: KVGeometry, enabled: bool, host: HostTier | None = None
) -> tuple[PrefixCache, str | None]:
    """The prefix cache for this arena, or the no-op one with the reason it is off.
    With a ``host`` tier its evicted blocks spill there (``radix_spill.py``).

    Its unit is the smallest run of whole tokens filling whole chunks
    (``KVGeometry.cache_block``): sharing a chunk shares every token in it, so a
    chunk that ends inside a token can only be shared together with the next ones.
    If that run is as long as a whole slot, no prompt could ever hit: caching is
    off, and the reason says why."""
    if not enabled:
        return NoPrefixCache(), "disabled (enable_prefix_caching=False)"
    tokens, chunks = geo.cache_block()
    if tokens >= geo.max_tokens:
        return NoPrefixCache(), (
            f"off: {geo.bytes_per_token} bytes per token and {geo.chunk_size}-byte chunks "
            f"share whole tokens only every {tokens} tokens ({chunks} chunks), not less "
            f"than a slot of {geo.max_tokens} tokens"
        )
    if host is not None:
        return SpillRadixCache(tokens, chunks, host), None
    return RadixPrefixCache(tokens, chunks), None


def map_scratch_slot(
    arena: KVArena,
    keep_idle_chunks: int | None,
    prefix_cache: PrefixCache | None = None,
    idle_timeout_s: float | None = None,
    cache_budget_bytes: int | None = None,
) -> KVCacheManager:
    """Map the scratch slot's first token; the KV manager gets the rest of the pool.
    ``keep_idle_chunks=None`` gives the default watermark (``default_watermark``)."""
    geo = arena.geometry
    scratch_chunks = geo.chunks_for(1)
    if geo.capacity_chunks <= scratch_chunks:
        raise ValueError(
            f"KV budget of {arena.pool.capacity_bytes} bytes leaves no chunk for requests"
        )
    arena.vt.map(SCRATCH_SLOT * geo.slot_bytes, scratch_chunks * geo.chunk_size)
    capacity = geo.capacity_chunks - scratch_chunks
    if keep_idle_chunks is None:
        keep_idle_chunks = default_watermark(capacity)
    return KVCacheManager(
        replace(geo, capacity_chunks=capacity),
        keep_idle_chunks=keep_idle_chunks,
        idle_timeout_s=idle_timeout_s,
        cache_budget_chunks=None
        if cache_budget_bytes is None
        else cache_budget_bytes // geo.chunk_size,
        reserved_slots=SCRATCH_SLOT + 1,
        prefix_cache=prefix_cache,
    )
