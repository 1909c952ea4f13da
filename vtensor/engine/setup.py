"""Turn an EngineConfig into a loaded model, a tokenizer, a KV arena and a runner.

``build_rank`` builds what every tensor-parallel rank holds (rank 0 and workers
alike, in the same order, since some steps are collective: the KV budget is
the smallest rank's, and CUDA graph captures hold all-reduces).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from vtensor.distributed import TPGroup
from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.idle_policy import default_watermark
from vtensor.kvcache.layout import KVLayout
from vtensor.kvcache.manager import KVCacheManager, KVGeometry
from vtensor.kvcache.prefix_cache import NoPrefixCache, PrefixCache
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.memory import ChunkPool, open_backend
from vtensor.models.attention import AttentionBackend
from vtensor.models.attention_backends import ATTENTION_BACKENDS, select_backend
from vtensor.models.config import DTYPES, ModelConfig, shape_config
from vtensor.models.embedded import EMBEDDED_NAME, embedded_config, embedded_tokenizer
from vtensor.models.llama import LlamaForCausalLM
from vtensor.models.loader import build_model
from vtensor.models.offload.weights import OffloadedWeights
from vtensor.models.tokenizer import Tokenizer
from vtensor.models.virtual_weights import VirtualWeights

from .config import DeviceUnavailableError, EngineConfig
from .cuda_graphs import DecodeGraphs
from .offload_setup import build_offloaded, step_workspace_bytes
from .runner import ModelRunner
from .sleep import build_virtual, fill_weights
from .token_table import TokenTable

CPU_KV_BYTES = 256 << 20
CPU_CHUNK = 64 << 10  # small host chunks: tiny models still take several per request
# The scratch slot takes CUDA graphs' padding rows and is mapped for good. It must be
# slot 0: every layer view's base pointer lies in its first token, and Triton rejects a
# kernel argument whose base address is not mapped.
SCRATCH_SLOT = 0
log = logging.getLogger("vtensor.engine")


@dataclass(frozen=True)
class EngineRuntime:
    """Values derived from the config and the machine (never written back into it)."""

    device: torch.device
    dtype: torch.dtype
    model_name: str
    random_weights: bool
    max_model_len: int
    attention_backend: str  # resolved: a key of ATTENTION_BACKENDS
    use_cuda_graphs: bool
    async_scheduling: bool


@dataclass(frozen=True)
class RankParts:
    """What one rank holds: its model shard, KV arena and runner (and rank 0's books)."""

    model_config: ModelConfig
    runtime: EngineRuntime
    model: LlamaForCausalLM
    arena: KVArena
    pool: ChunkPool
    kv: KVCacheManager  # the KV books: only rank 0's are used
    runner: ModelRunner
    offload: OffloadedWeights | None = None  # weight offload's host copies and ring
    weights: VirtualWeights | None = None  # sleep mode: the weights' virtual range


def resolve_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """The device asked for; a tensor-parallel rank's CUDA device is its local rank's."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {requested!r} was asked for, but torch sees no GPU on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    if device.type == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"tensor-parallel local rank {local_rank} needs GPU {local_rank}, but this "
                f"machine has {torch.cuda.device_count()}"
            )
        return torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is None:
        # An explicit index: torch.cuda.set_device (and device comparisons with tensors,
        # which always carry one) need it.
        return torch.device("cuda", torch.cuda.current_device())
    return device


def build_rank(config: EngineConfig, group: TPGroup, local_rank: int | None) -> RankParts:
    """This rank's model shard, arena (scratch slot mapped) and runner (graphs captured)."""
    cfg, name = model_config(config)
    rt = runtime_for(config, cfg, name, local_rank)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)  # kernels, graphs and events of this rank's GPU
    model, offload, weights = load_model(config, cfg, rt, group)
    try:
        return _finish_rank(config, group, cfg, rt, model, offload, weights)
    except BaseException:
        if offload is not None:  # pinned host memory outlives a failed engine otherwise
            offload.close()
        if weights is not None:
            weights.close()
        raise


def _finish_rank(
    config: EngineConfig,
    group: TPGroup,
    cfg: ModelConfig,
    rt: EngineRuntime,
    model: LlamaForCausalLM,
    offload: OffloadedWeights | None,
    weights: VirtualWeights | None,
) -> RankParts:
    arena, pool = build_arena(config, rt, cfg, model.shard.num_kv_heads, group)
    # Invariant the workers rely on: rank 0's KV commands fit every rank's arena.
    geometries = group.gather_objects(arena.geometry) or []
    if any(g != geometries[0] for g in geometries):
        raise RuntimeError(f"the ranks' KV arenas differ (rank 0 first): {geometries}")
    kv = map_scratch_slot(
        arena,
        config.keep_idle_chunks,
        idle_timeout_s=config.kv_idle_timeout_s,
        cache_budget_bytes=config.prefix_cache_max_bytes,
    )
    # This rank's query heads: the decode workspace is sized for its shard.
    attn = build_attention(rt, arena, model.shard.num_heads, config.max_num_seqs)
    runner = build_runner(config, rt, model, attn, arena.layout)
    return RankParts(cfg, rt, model, arena, pool, kv, runner, offload, weights)


def model_config(config: EngineConfig) -> tuple[ModelConfig, str]:
    if config.model is not None:
        return ModelConfig.from_dir(config.model), config.model
    if config.shape is not None:
        return shape_config(config.shape), f"random-{config.shape}"
    return embedded_config(), EMBEDDED_NAME


def runtime_for(
    config: EngineConfig, cfg: ModelConfig, name: str, local_rank: int | None = None
) -> EngineRuntime:
    device = resolve_device(config.device, local_rank)
    if config.dtype != "auto":
        dtype = DTYPES[config.dtype]
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        dtype = cfg.dtype if cfg.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    limit = cfg.max_position_embeddings
    if cfg.sliding_window is not None:
        limit = min(limit, cfg.sliding_window)  # full attention equals sliding up to the window
    max_len = config.max_model_len or limit
    if max_len > limit:
        raise ValueError(f"max_model_len {max_len} exceeds the model's limit of {limit}")
    attn = select_backend(config.attention_backend, device, dtype, cfg.head_dim)
    # Graphs only for a capturable backend (the torch reference syncs on host ints).
    graphs = device.type == "cuda" and not config.enforce_eager and attn.supports_cuda_graphs
    overlap = config.async_scheduling
    if overlap is None:
        overlap = device.type == "cuda"
    return EngineRuntime(
        device, dtype, name, config.model is None, max_len, attn.name, graphs, overlap
    )


def build_attention(
    rt: EngineRuntime, arena: KVArena, q_heads: int, max_num_seqs: int
) -> AttentionBackend:
    """The runtime's attention backend over the arena's layer views; a step decodes at
    most ``max_num_seqs`` requests."""
    return ATTENTION_BACKENDS[rt.attention_backend](
        arena.views, q_heads=q_heads, max_batch=max_num_seqs
    )


def load_model(
    config: EngineConfig, cfg: ModelConfig, rt: EngineRuntime, group: TPGroup | None = None
) -> tuple[LlamaForCausalLM, OffloadedWeights | None, VirtualWeights | None]:
    """The model with its weights; with weight offload, what holds the offloaded ones;
    with sleep mode, the virtual range that holds them all."""
    built, weights = None, None
    if config.offloads:  # EngineConfig refuses offload with tensor parallelism
        built = build_offloaded(config, cfg, rt.device, rt.dtype, rt.max_model_len)
    elif config.enable_sleep_mode:  # and sleep mode with offload or tensor parallelism
        model, weights = build_virtual(cfg, rt.device, rt.dtype, rt.max_model_len)
    if built is not None:
        model, offload = built
    elif weights is None:
        model, offload = build_model(cfg, rt.device, rt.dtype, rt.max_model_len, group), None
    else:
        offload = None
    try:
        fill_weights(model, config)
        if offload is not None:
            offload.bind(model)
    except BaseException:
        for holder in (offload, weights):
            if holder is not None:
                holder.close()
        raise
    return model, offload, weights


def load_tokenizer(config: EngineConfig, cfg: ModelConfig) -> Tokenizer | None:
    if config.model is not None:
        try:
            return Tokenizer.from_dir(config.model, eos_token_ids=cfg.eos_token_ids)
        except FileNotFoundError:
            return None  # token-id prompts still work
    return None if config.shape is not None else embedded_tokenizer()


def kv_budget(config: EngineConfig, rt: EngineRuntime, cfg: ModelConfig) -> int:
    """Bytes for the KV pool: the user's figure, else what the device can spare."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if rt.device.type == "cpu":
        return CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(rt.device)
    # Room for activations of the largest step and the logits of a full decode batch,
    # plus CUDA graph pools.
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
    layout = KVLayout(
        config.max_num_seqs + 1,
        max_tokens,
        cfg.num_layers,
        kv_heads,
        cfg.head_dim,
        rt.dtype,
    )
    pool = ChunkPool(backend, group.min_int(kv_budget(config, rt, cfg)))
    return KVArena(layout, pool, rt.device), pool


def prefix_cache_for(geo: KVGeometry, enabled: bool) -> tuple[PrefixCache, str | None]:
    """The prefix cache for this arena, or the no-op one with the reason it is off.

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


def build_runner(
    config: EngineConfig,
    rt: EngineRuntime,
    model: LlamaForCausalLM,
    attn: AttentionBackend,
    layout: KVLayout,
) -> ModelRunner:
    """The runner with its token table, and the decode graphs captured (CUDA)."""
    tokens = TokenTable(layout.num_slots, rt.device)
    graphs = None
    if rt.use_cuda_graphs:
        scratch = (SCRATCH_SLOT, layout.row_start(SCRATCH_SLOT))
        graphs = DecodeGraphs(
            model, attn, config.max_num_seqs, rt.max_model_len, scratch, tokens.tokens
        )
        graphs.capture()
    return ModelRunner(model, attn, layout, tokens, graphs)
