"""Build a model and fill it: from a HF checkpoint directory, or with random weights.

HF names map onto ours one to one, except the fused projections; the table
below says which slice of which fused weight each HF tensor fills.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from .config import ModelConfig
from .llama import LlamaForCausalLM

# HF suffix -> (our suffix, shard index); shards in order q, k, v / gate, up.
FUSED: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def build_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int
) -> LlamaForCausalLM:
    """An uninitialised model on ``device`` (no host copy of the weights is made)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty unties; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset_tables()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_random(model: LlamaForCausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights in place: N(0, std) matrices, unit norms, zero biases."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


@torch.no_grad()
def load_checkpoint(model: LlamaForCausalLM, path: str | Path) -> None:
    """Copy every tensor of a HF safetensors checkpoint into ``model``.

    Raises ``ValueError`` naming what is missing, unexpected or mis-shaped;
    the model is then only partly loaded and must not be used.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg = model.config
    loaded: set[str] = set()
    for hf_name, tensor in _tensors(Path(path)):
        if "rotary_emb" in hf_name:
            continue
        target, start, size = _target(cfg, hf_name)
        if target not in params:
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
        dest = params[target].narrow(0, start, size) if size else params[target]
        if dest.shape != tensor.shape:
            raise ValueError(
                f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded.add(f"{target}:{start}")
    expected = {f"{n}:{s}" for n, p in params.items() for s in _shard_starts(cfg, n, p)}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight:0")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _target(cfg: ModelConfig, hf_name: str) -> tuple[str, int, int]:
    """(our parameter name, first row, rows) for a HF tensor; rows 0 = whole tensor."""
    for hf, (ours, shard) in FUSED.items():
        if f".{hf}." in hf_name:
            sizes = _shard_sizes(cfg, ours)
            return hf_name.replace(hf, ours), sum(sizes[:shard]), sizes[shard]
    return hf_name, 0, 0


def _shard_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _shard_starts(cfg: ModelConfig, name: str, p: torch.Tensor) -> list[int]:
    for ours in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        if f".{ours}." in name:
            sizes = _shard_sizes(cfg, ours)
            return [sum(sizes[:i]) for i in range(len(sizes))]
    return [0]


def shard_path(model_dir: Path, name: object) -> Path:
    """The file a ``weight_map`` entry names, which must lie inside the model directory.

    The index is data from wherever the checkpoint came from: an absolute name or one
    that climbs out with ``..`` would read any file the server can. The check is on the
    name, not on where links lead: the HF cache's snapshot folders link every file to
    a blob outside them, and those must load."""
    parts = PurePosixPath(str(name)).parts
    if (
        not isinstance(name, str)
        or not parts
        or PurePosixPath(name).is_absolute()
        or (".." in parts or "\\" in name)
    ):
        raise ValueError(
            f"the checkpoint index names shard {name!r}, outside the model directory "
            f"{model_dir}: a shard must be a file name inside it"
        )
    return model_dir.joinpath(*parts)


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    for file in files:
        with safe_open(str(shard_path(path, file)), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)
