"""Tiny random HF checkpoints, written by ``transformers``' own classes.

Weights are drawn with a larger-than-usual std so that greedy decoding has
clear margins between the top tokens: an exact token match with HF then tests
the model, not float rounding in near-ties. The std is ``1.2 / sqrt(hidden)``
(0.15 at the default width 64), so each projection has the same gain at any
width: at width 512 a fixed 0.15 made the network chaotic, amplifying fp32
rounding to 1e-3 nats within 160 tokens (1e-6 at the scaled std; H100 and CPU),
which flipped near-ties between engines that batch differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from vtensor.models.embedded import embedded_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
BASE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
)


def hf_config(arch: str, **overrides: Any) -> Any:
    import transformers

    kw = {**BASE, "head_dim": 16, **overrides}
    kw.setdefault("initializer_range", 1.2 / math.sqrt(kw["hidden_size"]))
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(**kw)
    raise ValueError(arch)


def make_checkpoint(
    path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    """Save a random ``arch`` model (and a tokenizer) to ``path``; returns the HF model."""
    import transformers

    cfg = hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # bias and norm weights are not all ones/zeros: test them too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="200KB" if arch == "qwen2" else "5GB")
    save_tokenizer(path)
    return model


def save_tokenizer(path: Path) -> None:
    tok = embedded_tokenizer()
    tok._tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": tok.chat_template}
        )
    )


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    lens = torch.randint(lo, hi, (n,)).tolist()
    return [torch.randint(2, vocab, (n_,)).tolist() for n_ in lens]


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], max_new: int) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()
