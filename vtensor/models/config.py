"""Model configuration: the Llama family, read from a HF ``config.json``.

``ModelConfig`` is frozen and validated; it says *what* the network is. How
it runs (device, dtype, KV budget) belongs to the engine's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

# HF ``architectures`` string -> (qkv bias, q/k RMSNorm). One implementation serves all.
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {self.kind!r}; supported: {ROPE_TYPES}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("rope theta and factor must be positive")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: int | None = None
    dtype: torch.dtype = torch.bfloat16  # the checkpoint's dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers * per_layer + h + head

    def decode_read_params(self) -> int:
        """Parameters a decode step reads in full: all but an untied embedding table,
        of which it gathers only one row per request."""
        table = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_params() - table

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), archs[0] if archs else "?")
        bias, qk_norm = ARCHITECTURES.get(arch, (False, False))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        if dtype_name not in DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {dtype_name!r}")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias or bool(cfg.get("attention_bias", False)),
            qk_norm=qk_norm,
            rope=_rope_from_hf(cfg),
            sliding_window=window,
            dtype=DTYPES[dtype_name],
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            bos_token_id=cfg.get("bos_token_id"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        cfg = json.loads(file.read_text())
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (Llama family: silu)")
        return cls.from_hf(cfg)


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    """Rope settings from either the transformers 4 (``rope_theta`` + ``rope_scaling``)
    or the transformers 5 (``rope_parameters``) spelling."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
    )


# Shapes of known models, for benchmarks with random weights (NOTES §6).
SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        "LlamaForCausalLM",
        128256,
        4096,
        32,
        32,
        8,
        128,
        14336,
        max_position_embeddings=8192,
        rope=RopeConfig(theta=500000.0),
        eos_token_ids=(128001,),
        bos_token_id=128000,
    ),
    "qwen2.5-7b": ModelConfig(
        "Qwen2ForCausalLM",
        152064,
        3584,
        28,
        28,
        4,
        128,
        18944,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        attention_bias=True,
        rope=RopeConfig(theta=1e6),
        eos_token_ids=(151643,),
    ),
    "llama2-7b": ModelConfig(
        "LlamaForCausalLM",
        32000,
        4096,
        32,
        32,
        32,
        128,
        11008,
        eos_token_ids=(2,),
        bos_token_id=1,
    ),
}

# Llama-3-70B: 80 layers, GQA 64/8, the 8B's vocabulary (issue 16's two-GPU shape).
SHAPES["llama3-70b"] = replace(
    SHAPES["llama3-8b"],
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    intermediate_size=28672,
)

# Llama-3.1-8B: the Llama-3-8B shape with a 128k context (rope scaled the "llama3" way).
SHAPES["llama3.1-8b"] = replace(
    SHAPES["llama3-8b"],
    max_position_embeddings=131072,
    rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192),
)

# Llama-3.2-1B: 16 layers, GQA 32/8 of 64 dims, tied embeddings, 128k context (issue 13's
# small model beside the 8B on one GPU).
SHAPES["llama3.2-1b"] = replace(
    SHAPES["llama3-8b"],
    hidden_size=2048,
    num_layers=16,
    head_dim=64,
    intermediate_size=8192,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope=RopeConfig(theta=500000.0, kind="llama3", factor=32.0, original_max_position=8192),
)


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    return replace(SHAPES[name])
