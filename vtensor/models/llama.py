"""The Llama architecture family in plain torch: Llama 2/3, Mistral, Qwen2, Qwen3.

One implementation, switched by ``ModelConfig`` flags (qkv bias, q/k norm).
Q/K/V and gate/up are fused into single matmuls; ``loader.py`` maps HF's
separate weights into their slices. Attention goes through an
:class:`AttentionBackend`, so the model never sees the cache layout.

Under tensor parallelism (``parallel.py``) each rank builds the same model over
its :class:`ModelShard`: its heads and MLP columns, its vocabulary rows; the o
and down projections and the embedding end in one all-reduce each. With one
rank every collective is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from vtensor.distributed import TPGroup

from .attention import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .fused import add_rms_norm, rms_norm, silu_mul
from .linear import Linear
from .offload.hooks import LayerHooks
from .parallel import ModelShard, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .rope import RopeAngles, RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` in one fused kernel on the GPU."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: ModelShard, group: TPGroup) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shard.num_heads,
            shard.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = shard.q_size, shard.kv_size
        self.qkv_proj = Linear(
            cfg.hidden_size, shard.q_size + 2 * shard.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = RowParallelLinear(shard.q_size, cfg.hidden_size, group)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeAngles,
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.q_norm is None or self.k_norm is None:
            # Rotary fused into the K/V store: one kernel per layer reads qkv once.
            q = attn.rope_store(self.layer, qkv, rope, self.num_heads, meta)
            o = attn.attend(self.layer, q, meta)
        else:  # Qwen3: q/k norms come between the projection and the rotation
            hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
            split = self.q_size + self.kv_size
            v = qkv[:, split:].unflatten(-1, (hkv, d))  # strided views: the kernels take strides
            q = rope.apply(self.q_norm(qkv[:, : self.q_size].unflatten(-1, (hq, d))))
            k = rope.apply(self.k_norm(qkv[:, self.q_size : split].unflatten(-1, (hkv, d))))
            o = attn.forward(self.layer, q, k, v, meta)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ModelShard, group: TPGroup) -> None:
        super().__init__()
        inter = shard.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: ModelShard, group: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, shard, group)
        self.mlp = MLP(cfg, shard, group)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeAngles,
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual)``; their sum is the layer's output. Leaving the add to
        the next layer's fused add+norm saves a kernel per layer (vLLM's pattern)."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm.add_forward(h, residual)
        a = self.self_attn(x, rope, attn, meta)
        x, residual = self.post_attention_layernorm.add_forward(a, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_positions: int, shard: ModelShard, group: TPGroup
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shard, cfg.hidden_size, group)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, shard, group) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)


class LlamaForCausalLM(nn.Module):
    """``forward`` maps packed tokens to final hidden states; ``logits`` projects rows
    (all of the vocabulary, on every rank of a tensor-parallel group)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, group: TPGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.group = group or TPGroup()
        self.shard = ModelShard.of(cfg, self.group.rank, self.group.size)
        self.model = LlamaModel(cfg, max_positions, self.shard, self.group)
        self.lm_head = ParallelLMHead(self.shard, cfg.hidden_size, self.group)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Weight offload (``offload/``): the prefetcher, called around every layer.
        self.offload: LayerHooks | None = None

    @property
    def max_positions(self) -> int:
        return self.model.rotary.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.angles(positions)
        residual: torch.Tensor | None = None
        hooks = self.offload
        if hooks is None:
            for layer in self.model.layers:
                h, residual = layer(h, residual, rope, attn, meta)
        else:  # offloaded weights: each layer's are in place when its kernels are queued
            hooks.begin_forward()
            for i, layer in enumerate(self.model.layers):
                hooks.before_layer(i)
                h, residual = layer(h, residual, rope, attn, meta)
                hooks.after_layer(i)
            hooks.end_forward()
        if residual is None:  # no layers
            return self.model.norm(h)
        return self.model.norm.add_forward(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
