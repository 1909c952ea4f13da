"""The engine's side of weight offload: from ``EngineConfig`` to a placed, built model.

``build_offloaded`` plans the placement (``vtensor.models.offload.policy``) from
the model's shapes alone, on the meta device, and logs it; when something must
be offloaded it gives the model memory under the placement, so no offloaded
tensor is ever allocated on the GPU. The caller fills the weights and binds.
"""

from __future__ import annotations

import logging

import torch

from vtensor.memory import PhysicalBackend, open_backend
from vtensor.models.config import ModelConfig
from vtensor.models.llama import LlamaForCausalLM
from vtensor.models.loader import meta_model
from vtensor.models.offload.inventory import inventory
from vtensor.models.offload.policy import GiB, OffloadRequest, WeightPlacement, plan_placement
from vtensor.models.offload.weights import OffloadedWeights

from .config import EngineConfig

log = logging.getLogger("vtensor.engine")
CPU_RING_CHUNK = 64 << 10  # the host backend's chunk for the ring on the CPU (tests)


def step_workspace_bytes(config: EngineConfig, cfg: ModelConfig, itemsize: int) -> int:
    """Activations of the largest step (a few ``[tokens, intermediate]`` buffers) and the
    fp32 logits of a full decode batch: what a step needs beside weights and KV."""
    activations = 8 * config.max_num_batched_tokens * cfg.intermediate_size * itemsize
    logits = 3 * config.max_num_seqs * cfg.vocab_size * 4
    return activations + logits


def offload_request(config: EngineConfig, slot_granularity: int) -> OffloadRequest:
    return OffloadRequest(
        gpu_memory_budget=config.gpu_memory_budget,
        cpu_offload_bytes=int(config.cpu_offload_gb * GiB),
        ring_depth=config.offload_ring_depth,
        slot_granularity=slot_granularity,
    )


def ring_backend(device: torch.device) -> PhysicalBackend:
    if device.type == "cuda":
        return open_backend("cuda", device=device.index or 0)
    return open_backend("host", chunk_size=CPU_RING_CHUNK)


def plan(
    config: EngineConfig, cfg: ModelConfig, model: LlamaForCausalLM, itemsize: int, chunk: int
) -> WeightPlacement:
    """The placement for the config's request over the (meta) model's tensors."""
    layers, fixed = inventory(model, cfg.num_layers)
    workspace = step_workspace_bytes(config, cfg, itemsize)
    return plan_placement(layers, fixed, workspace, offload_request(config, chunk))


def build_offloaded(
    config: EngineConfig,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
) -> tuple[LlamaForCausalLM, OffloadedWeights] | None:
    """The model with memory under the config's placement (weights unset), and what
    owns its host copies and ring; None when every weight fits on the GPU."""
    backend = ring_backend(device)
    try:
        model = meta_model(cfg, dtype, max_positions)
        placement = plan(config, cfg, model, dtype.itemsize, backend.chunk_size)
        log.info("%s", placement.describe())
        if not placement.order:
            backend.close()
            return None
        return model, OffloadedWeights.materialize(model, placement, device, backend)
    except BaseException:
        backend.close()  # idempotent; materialize hands it over only when it succeeds
        raise
