"""Sleep mode (vLLM's ``LLM.sleep`` / ``wake_up``): give the GPU back between uses.

With ``EngineConfig.enable_sleep_mode`` the weights are views of one virtual
range (``models/virtual_weights.py``). ``sleep(level)`` drops all KV (prefix
cache reset, idle slots unmapped, the pool's free chunks released to the
driver) and then the weights' chunks: level 1 first copies the weights to
pinned host memory; level 2 drops them, and ``wake_up`` reloads them from the
checkpoint (a random-weights model re-draws the same weights from its seed).
``wake_up`` maps fresh chunks at the same addresses: CUDA graphs captured over
the weights and the KV arena replay with no recapture. KV comes back on demand.

What stays while asleep: the scratch slot's chunks (CUDA graphs' padding rows,
one chunk or a few), RoPE's tables, the torch allocator's CUDA graph pools,
and the process's CUDA context.

The rules (each refusal changes nothing):

* sleeping needs an idle engine: with a request waiting or running it raises
  :class:`EngineBusyError` (the server answers 409);
* while asleep, adding a request raises :class:`EngineSleepingError` (the
  server answers 503), and so does a second ``sleep``;
* ``wake_up`` on an awake engine does nothing.

Not with weight offload or tensor parallelism yet (``EngineConfig`` refuses).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vtensor.kvcache.commands import ReleaseFreeCommand
from vtensor.memory import open_backend
from vtensor.models.config import ModelConfig
from vtensor.models.llama import LlamaForCausalLM
from vtensor.models.loader import init_random, load_checkpoint, meta_model
from vtensor.models.virtual_weights import VirtualWeights

from .config import EngineConfig

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger("vtensor.engine")
CPU_WEIGHT_CHUNK = 64 << 10  # the host backend's chunk for the weights on the CPU (tests)
LEVELS = (1, 2)


class SleepModeError(RuntimeError):
    """Sleep mode cannot do what was asked (it is off, or the engine is busy/asleep)."""


class EngineSleepingError(SleepModeError):
    """The engine is asleep: ``wake_up()`` first. Nothing was queued or changed."""


class EngineBusyError(SleepModeError):
    """Requests are unfinished, so the engine cannot sleep. Nothing was dropped."""


def build_virtual(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    keep_host_buffer: bool = True,
) -> tuple[LlamaForCausalLM, VirtualWeights]:
    """The model with its parameters in a weight region of their own (weights unset)."""
    if device.type == "cuda":
        backend = open_backend("cuda", device=device.index or 0)
    else:
        backend = open_backend("host", chunk_size=CPU_WEIGHT_CHUNK)
    model = meta_model(cfg, dtype, max_positions)
    return model, VirtualWeights.materialize(model, device, backend, keep_host_buffer)


def fill_weights(model: LlamaForCausalLM, config: EngineConfig) -> None:
    """The checkpoint's weights, or the seed's random ones (the same every time)."""
    if config.model is not None:
        load_checkpoint(model, config.model)
    else:
        init_random(model, seed=config.seed)


class SleepMode:
    """The engine's sleep state; every call runs on the engine's thread."""

    def __init__(self, engine: LLMEngine, weights: VirtualWeights | None) -> None:
        self.engine = engine
        self.weights = weights
        self.level: int | None = None  # None: awake

    @property
    def is_sleeping(self) -> bool:
        return self.level is not None

    def check_awake(self) -> None:
        if self.level is not None:
            raise EngineSleepingError(
                f"the engine is asleep (level {self.level}); wake_up() before generating"
            )

    def sleep(self, level: int = 1) -> None:
        """Drop all KV, then offload (level 1) or discard (level 2) the weights."""
        if level not in LEVELS:
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        weights = self._weights()
        self.check_awake()
        engine = self.engine
        if engine.has_unfinished() or not engine.reset_prefix_cache():
            raise EngineBusyError(
                "requests are unfinished: let them finish (or abort them) before sleeping"
            )
        self._synchronize()  # no kernel of a finished step may still read what goes
        # The mapper thread releases the pool's free chunks after the unmaps queued above.
        engine.arena.apply([ReleaseFreeCommand(keep_free=0)])
        engine.arena.wait_all()
        if level == 1:
            weights.offload()
        else:
            weights.discard()
        if engine.runtime.device.type == "cuda":
            torch.cuda.empty_cache()  # activations' cached blocks (graph pools stay)
        self.level = level
        log.info("asleep at level %d", level)

    def wake_up(self) -> None:
        """Map the weights back at the same addresses (level 2: and reload them)."""
        if self.level is None:
            return
        weights = self._weights()
        weights.restore()
        if self.level == 2:
            try:
                fill_weights(self.engine.model, self.engine.config)
                self._synchronize()
            except BaseException:
                weights.discard()  # still asleep, as before the call
                raise
        log.info("awake (was asleep at level %d)", self.level)
        self.level = None

    def _weights(self) -> VirtualWeights:
        if self.weights is None:
            raise SleepModeError(
                "sleep mode is off: build the engine with enable_sleep_mode=True "
                "(--enable-sleep-mode)"
            )
        return self.weights

    def _synchronize(self) -> None:
        device = self.engine.runtime.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
