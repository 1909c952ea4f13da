"""The HF ``transformers`` peer: ``generate`` with a static cache and sdpa."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from vtensor.engine.setup import EngineRuntime
from vtensor.models.config import ModelConfig


def hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight HF model of ``cfg``'s shape (values do not matter for timing)."""
    import transformers

    # Keyword arguments for either config class; Any because a dict's value type is
    # one for all keys, and each constructor parameter has its own.
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    hf_cfg: transformers.PretrainedConfig
    if cfg.architecture == "Qwen2ForCausalLM":
        hf_cfg = transformers.Qwen2Config(**common)
    else:
        hf_cfg = transformers.LlamaConfig(head_dim=cfg.head_dim, **common)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.inference_mode()
def hf_decode_step_s(
    cfg: ModelConfig, rt: EngineRuntime, batch: int, ctx: int, steps: int
) -> float:
    """Seconds per decode step: (generate 1+steps tokens − generate 1) / steps."""
    model = hf_model(cfg, rt.device, rt.dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, ctx), device=rt.device)
    _generate(model, ids, 1)  # warm-up, both shapes
    _generate(model, ids, 1 + steps)
    prefill = min(_generate(model, ids, 1) for _ in range(2))
    total = min(_generate(model, ids, 1 + steps) for _ in range(2))
    return (total - prefill) / steps


def hf_decode_step_or_none(
    cfg: ModelConfig, rt: EngineRuntime, batch: int, ctx: int, steps: int
) -> float | None:
    """As above, but None when HF runs out of memory (it prefills the whole batch at once)."""
    try:
        return hf_decode_step_s(cfg, rt, batch, ctx, steps)
    except torch.OutOfMemoryError as exc:
        print(f"  HF peer out of memory at batch {batch}: {str(exc).splitlines()[0]}")
        return None
    finally:
        gc.collect()  # the model and its static cache
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()


def _generate(model: Any, ids: torch.Tensor, new: int) -> float:
    """Wall seconds of one ``generate`` of exactly ``new`` tokens."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        disable_compile=True,  # eager: compiling an 8B model per shape costs minutes
        pad_token_id=0,
    )
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0
