"""EngineConfig: what the user asks for. Derived values live in ``EngineRuntime``."""

from __future__ import annotations

from dataclasses import dataclass

from vtensor.models.config import DTYPES as MODEL_DTYPES
from vtensor.models.config import SHAPES

DTYPES = ("auto", *MODEL_DTYPES)
# The names of ``vtensor.models.attention_backends.ATTENTION_BACKENDS`` (kept here so that
# the CLI parses them without importing Triton; a test checks they agree).
ATTENTION_BACKENDS = ("triton", "fa2", "torch")


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that this machine does not have."""


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, validated on construction.

    ``model`` is a HF checkpoint directory; ``shape`` instead builds random
    weights of a known model's shape (benchmarks); neither gives the embedded
    tiny random model. ``device=None`` picks CUDA when present.
    ``kv_cache_bytes=None`` sizes the KV pool from free memory (GPU) or 256 MiB (CPU).
    ``async_scheduling=None`` turns it on for CUDA only.
    ``attention_backend`` is one of ``ATTENTION_BACKENDS``; ``None`` or ``"auto"``
    picks ``triton`` on CUDA and ``torch`` (the fp32 reference) on the CPU. Whether
    the backend can run on the device, dtype and head size is checked when the
    engine resolves it (``setup.runtime_for``), before the model loads.

    ``tensor_parallel_size`` splits the model over that many processes, one GPU each
    (``cuda:<local rank>``; gloo processes on the CPU). ``nnodes``, ``node_rank``,
    ``master_addr`` and ``master_port`` are the rendezvous (``vtensor.distributed``);
    under torchrun its environment gives them instead.

    Weight offload (``vtensor.models.offload``): ``cpu_offload_gb`` (vLLM's name) is
    the GPU memory, in GiB, that offloading layer weights to host memory must save,
    net of the ring they stream through; ``gpu_memory_budget`` instead bounds the
    model's GPU bytes (weights kept on the GPU, the ring, the step's workspace). The
    engine places the weights (``offload/policy.py``); a budget too small for even the
    fixed weights, the ring and the workspace is an error naming the smallest that
    works. ``offload_ring_depth`` is the number of ring slots (>= 2). The KV cache is
    sized apart (``kv_cache_bytes`` / ``gpu_memory_utilization``). Not with tensor
    parallelism yet.
    """

    model: str | None = None
    shape: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    chunk_size: int | None = None  # host backend only; CUDA uses the driver granularity
    lookahead_tokens: int = 4
    # Bounded deferred reclamation (kvcache/idle_policy.py): idle slots keep at most
    # keep_idle_chunks mappings in all (None: the larger of 64 chunks and 5% of the KV
    # budget), each for at most kv_idle_timeout_s seconds (None: no time limit); past
    # either, the chunks are unmapped and released to the driver on the mapper thread.
    keep_idle_chunks: int | None = None
    kv_idle_timeout_s: float | None = 2.0
    # The prefix cache's own budget: past it, unlocked blocks are evicted (LRU) when a
    # request finishes (None: no budget of its own; the KV pool bounds it).
    prefix_cache_max_bytes: int | None = None
    # Reuse the KV of cached prefixes (shared physical chunks; vLLM's flag, on by default).
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Launch each step before reading the previous one's tokens (None: on for CUDA,
    # where it hides the host's per-step work behind the GPU's; off on the CPU).
    async_scheduling: bool | None = None
    attention_backend: str | None = None
    seed: int = 0
    # Run LLMEngine.check_integrity every N steps (0: never). A debugging aid: each check
    # waits for the mapper thread and walks every request.
    debug_check_every: int = 0
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: any free port (one node only)
    # A collective that a rank never joins fails after this long (a dead rank is usually
    # reported at once: see vtensor.distributed.procs).
    distributed_timeout_s: float = 600.0
    cpu_offload_gb: float = 0.0
    gpu_memory_budget: int | None = None
    offload_ring_depth: int = 2
    # Sleep mode (vLLM's flag; engine/sleep.py): the weights live in a virtual range that
    # LLM.sleep() releases and wake_up() maps back at the same addresses.
    enable_sleep_mode: bool = False
    # Level-1 sleep keeps its pinned host buffer after wake_up, so only the first sleep
    # pays for pinning (seconds per 16 GB); off: the buffer is freed at every wake_up.
    sleep_keep_host_buffer: bool = True
    # Host KV tier (engine/swap.py): bytes of pinned host memory that preempted requests'
    # KV is swapped to (vLLM's --swap-space, in bytes here). 0 (the default) turns
    # swapping off: every preemption recomputes. preemption_mode (vLLM's name) forces
    # "swap" or "recompute"; None lets the cost model (kvcache/swap_policy.py) choose.
    swap_space_bytes: int = 0
    preemption_mode: str | None = None
    # SLO-aware admission (engine/slo_policy.py): time-to-first-token and time-per-output-
    # token targets in milliseconds (None: off). Waiting requests are admitted in order of
    # TTFT slack; one about to miss its TTFT for lack of KV memory has running requests
    # with TPOT slack swapped out to the host tier (needs swap_space_bytes) to admit it.
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    # One budget for the KV cache and the forward's workspace (engine/elastic.py): the KV
    # may borrow what the next step's workspace does not need (inflate) and gives it back
    # before a step that needs it (deflate). kv_cache_bytes (or what the GPU can spare,
    # the workspace reserve not subtracted) is then the unified budget.
    unified_memory_pool: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and self.shape is not None:
            raise ValueError("give either model (a checkpoint) or shape (random weights), not both")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in (None, "auto", *ATTENTION_BACKENDS):
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; "
                f"known: {', '.join(ATTENTION_BACKENDS)} (or auto)"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.chunk_size is not None and (self.chunk_size <= 0 or self.chunk_size % 4096):
            raise ValueError("chunk_size must be a positive multiple of 4096")
        if self.keep_idle_chunks is not None and self.keep_idle_chunks < 0:
            raise ValueError("keep_idle_chunks must be >= 0 (or None for the default)")
        if self.kv_idle_timeout_s is not None and not self.kv_idle_timeout_s >= 0:
            raise ValueError("kv_idle_timeout_s must be >= 0 (or None: no time limit)")
        if self.prefix_cache_max_bytes is not None and self.prefix_cache_max_bytes < 0:
            raise ValueError("prefix_cache_max_bytes must be >= 0 (or None: no budget)")
        if self.lookahead_tokens < 0:
            raise ValueError("lookahead_tokens must be >= 0")
        if self.debug_check_every < 0:
            raise ValueError("debug_check_every must be >= 0")
        self._check_parallel()
        self._check_offload()
        self._check_swap()
        self._check_slo()
        if self.unified_memory_pool and (
            self.is_parallel or self.offloads or self.enable_sleep_mode
        ):
            raise ValueError(
                "unified_memory_pool does not support tensor_parallel_size > 1, weight "
                "offload (cpu_offload_gb / gpu_memory_budget) or enable_sleep_mode yet"
            )
        if self.enable_sleep_mode and (self.offloads or self.is_parallel):
            raise ValueError(
                "enable_sleep_mode does not support weight offload (cpu_offload_gb / "
                "gpu_memory_budget) or tensor_parallel_size > 1 yet"
            )

    def _check_slo(self) -> None:
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(
                    f"{name} must be a positive number of milliseconds (or None), got {v!r}"
                )

    @property
    def slo_enabled(self) -> bool:
        return self.ttft_slo_ms is not None or self.tpot_slo_ms is not None

    def _check_swap(self) -> None:
        if self.swap_space_bytes < 0:
            raise ValueError("swap_space_bytes must be >= 0 (0: no host KV tier)")
        if self.preemption_mode not in (None, "swap", "recompute"):
            raise ValueError("preemption_mode must be 'swap', 'recompute' or None")
        if self.swap_space_bytes and self.tensor_parallel_size > 1:
            raise ValueError("swap_space_bytes (the host KV tier) needs tensor_parallel_size 1")

    def _check_parallel(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"need nnodes >= 1 and 0 <= node_rank < nnodes, got "
                             f"{self.nnodes}, {self.node_rank}")  # fmt: skip
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple of "
                f"nnodes {self.nnodes}"
            )
        if self.tensor_parallel_size > 1 and self.device not in (None, "cpu", "cuda"):
            raise ValueError(
                f"with tensor_parallel_size > 1 each rank uses cuda:<local rank>; give "
                f"device 'cuda' (or 'cpu'), not {self.device!r}"
            )
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} is not a TCP port")
        if self.distributed_timeout_s <= 0:
            raise ValueError("distributed_timeout_s must be positive")

    def _check_offload(self) -> None:
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")
        if self.gpu_memory_budget is not None and self.gpu_memory_budget <= 0:
            raise ValueError(f"gpu_memory_budget must be positive, got {self.gpu_memory_budget}")
        if self.cpu_offload_gb and self.gpu_memory_budget is not None:
            raise ValueError("give cpu_offload_gb or gpu_memory_budget, not both")
        if self.offload_ring_depth < 2:
            raise ValueError(f"offload_ring_depth must be >= 2, got {self.offload_ring_depth}")
        if self.offloads and self.tensor_parallel_size > 1:
            raise ValueError(
                "weight offload (cpu_offload_gb / gpu_memory_budget) does not support "
                "tensor parallelism yet: use one GPU, or split the model with -tp alone"
            )

    @property
    def offloads(self) -> bool:
        """Whether weight offload was asked for (it may still find everything fits)."""
        return self.cpu_offload_gb > 0 or self.gpu_memory_budget is not None

    @property
    def is_parallel(self) -> bool:
        return self.tensor_parallel_size > 1
