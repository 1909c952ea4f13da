"""Building the unified memory pool (``EngineConfig.unified_memory_pool``): the workspace
table, the planner over the KV manager's budget, and installing them in an engine.

At build the table is an *estimate* from tensor shapes (the same formula that sizes
the static split's workspace reserve, ``offload_setup.step_workspace_bytes``, per
step size); on a GPU, warm-up replaces it with one *measured* on the device
(``workspace_measure.py``). On the CPU the estimate stays: torch has no allocator
there to ask, and the table says so (``WorkspaceTable.source``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from vtensor.kvcache.elastic_planner import ElasticPlanner
from vtensor.kvcache.geometry import KVGeometry
from vtensor.kvcache.workspace_table import WorkspaceTable, doubling_points
from vtensor.memory.torch_workspace import TorchWorkspace
from vtensor.memory.workspace_arena import WorkspaceArena
from vtensor.models.config import ModelConfig

from .config import EngineConfig
from .elastic import ElasticMemory
from .input_processor import InputProcessor

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

LOGIT_COPIES = 3  # fp32 logits, their softmax and a draw's copy: step_workspace_bytes's 3


def logits_bytes(cfg: ModelConfig, rows: int) -> int:
    """The sampling rows' share of a step's workspace (fp32 logits and their copies)."""
    return LOGIT_COPIES * rows * cfg.vocab_size * 4


def estimate_table(
    config: EngineConfig, cfg: ModelConfig, itemsize: int, chunk_size: int
) -> WorkspaceTable:
    """The workspace of a step of ``t`` tokens from shapes: a few ``[t, intermediate]``
    activations and the logits of its most rows, ``min(t, max_num_seqs)``. Labelled
    ``estimated``."""
    points = [
        (
            t,
            8 * t * cfg.intermediate_size * itemsize
            + logits_bytes(cfg, min(t, config.max_num_seqs)),
        )
        for t in doubling_points(config.max_num_batched_tokens)
    ]
    return WorkspaceTable.monotone(points, chunk_size, "estimated")


def request_geometry(geometry: KVGeometry, memory: ElasticMemory) -> KVGeometry:
    """What the pool can ever give one request: the budget less one token's workspace
    and the chunk its step may start (``ElasticPlanner.growth``), so that a request the
    contract accepts always fits beside the smallest step."""
    planner = memory.planner
    assert isinstance(planner, ElasticPlanner)
    most = memory.budget - planner.table.chunks_for(1) - planner.growth(1, 1)
    return replace(geometry, capacity_chunks=max(0, min(geometry.capacity_chunks, most)))


def install(engine: LLMEngine, table: WorkspaceTable, provisional: bool = False) -> ElasticMemory:
    """Give ``engine``'s scheduler a unified pool planned with ``table`` (at build, and
    again at warm-up with the measured table): the KV manager's limit, the request
    contract and the pool's capacity follow. Nothing may be running. ``provisional``:
    an estimate that warm-up will replace (``ElasticMemory``)."""
    if engine.has_unfinished():
        raise RuntimeError("the unified pool's table can only be set with no request unfinished")
    kv = engine.kv
    geometry = kv.geometry
    memory = ElasticMemory(
        ElasticPlanner(table, geometry.bytes_per_token), geometry.capacity_chunks, provisional
    )
    kv.reclaim_all()  # nothing runs: idle KV may sit above the new limit
    excess = kv.books.committed - memory.kv_capacity
    if excess > 0:
        kv.evict(excess)
    kv.capacity.set_limit(memory.kv_capacity)
    engine.scheduler.memory = memory
    model = engine.model_config
    engine.inputs = InputProcessor(
        engine.tokenizer, model.vocab_size, engine.runtime.max_model_len,
        request_geometry(geometry, memory),
    )  # fmt: skip
    return memory


def build_unified(engine: LLMEngine) -> None:
    """At build: the unified pool planned with the shape-based estimate (provisional on
    CUDA, where warm-up measures the table), and on CUDA the pool-backed workspace."""
    cuda = engine.runtime.device.type == "cuda"
    geometry = engine.kv.geometry
    itemsize = engine.runtime.dtype.itemsize
    estimate = estimate_table(engine.config, engine.model_config, itemsize, geometry.chunk_size)
    install(engine, estimate, provisional=cuda)
    if cuda:
        attach_workspace(engine)  # the forward's workspace draws on the KV's pool


def attach_workspace(engine: LLMEngine) -> TorchWorkspace:
    """On CUDA, make the forward pass's workspace draw on the KV's chunk pool: an arena
    of the whole budget's address range, torch's eager-step allocations routed to it
    (``ModelRunner.workspace``), and the pool's capacity fixed at the scratch slot plus
    the budget, which KV and workspace share chunk by chunk from then on."""
    memory = engine.scheduler.memory
    if memory is None or engine.runtime.device.type != "cuda":
        raise RuntimeError("the pool-backed workspace needs the unified pool on a CUDA device")
    pool, chunk = engine.pool, engine.kv.geometry.chunk_size
    arena = WorkspaceArena(pool, memory.budget * chunk)
    pool.set_capacity((engine.scratch_chunks + memory.budget) * chunk)
    workspace = TorchWorkspace(arena, engine.runtime.device)
    engine.runner.workspace = workspace
    return workspace
