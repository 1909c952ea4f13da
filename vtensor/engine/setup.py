"""Turn an EngineConfig into a loaded model, a tokenizer, a KV arena and a runner.

``build_rank`` builds what every tensor-parallel rank holds (rank 0 and workers
alike, in the same order, since some steps are collective: the KV budget is
the smallest rank's, and CUDA graph captures hold all-reduces).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vtensor.distributed import TPGroup
from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.layout import KVLayout
from vtensor.kvcache.manager import KVCacheManager
from vtensor.memory import ChunkPool
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
from .kv_setup import (
    SCRATCH_SLOT,
    build_arena,
    map_scratch_slot,
)
from .offload_setup import build_offloaded
from .runner import ModelRunner
from .sleep import build_virtual, fill_weights
from .token_table import TokenTable

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
        model, weights = build_virtual(
            cfg, rt.device, rt.dtype, rt.max_model_len, config.sleep_keep_host_buffer
        )
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
