"""Build a model and fill it: from a HF checkpoint directory, or with random weights.

HF names map onto ours one to one, except the fused projections; the table
below says which slice of which fused weight each HF tensor fills. Under
tensor parallelism (``parallel.py``) a rank reads only its own slice of each
split tensor, straight from the file (``safe_open(...).get_slice``): no rank
ever holds a whole split tensor, on the host or the device.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from vtensor.distributed import TPGroup

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .parallel import ModelShard

# HF suffix -> (our suffix, shard index); shards in order q, k, v / gate, up.
FUSED: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
# Row-parallel weights: the rank's slice is a range of input columns (dim 1).
ROW_PARALLEL = {"self_attn.o_proj": "q", "mlp.down_proj": "mlp"}
VOCAB = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint tensor goes: rows ``[dest, dest + length)`` of ``target``
    (the whole target when ``dim`` is None) take the checkpoint's range ``[start,
    start + length)`` along ``dim``."""

    target: str
    dest: int = 0
    dim: int | None = None
    start: int = 0
    length: int = 0


def meta_model(
    cfg: ModelConfig, dtype: torch.dtype, max_positions: int, group: TPGroup | None = None
) -> LlamaForCausalLM:
    """The model (this rank's shard) on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, group)
    return model.to(dtype=dtype)


def build_model(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    group: TPGroup | None = None,
) -> LlamaForCausalLM:
    """An uninitialised model (this rank's shard) on ``device``; no host copy is made."""
    model = meta_model(cfg, dtype, max_positions, group).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty unties; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset_tables()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_random(model: LlamaForCausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights in place: N(0, std) matrices, unit norms, zero biases (each rank
    draws its own shard from ``seed + rank``).

    The draws happen on the device of ``lm_head`` (always resident), in parameter
    order; a parameter held elsewhere (an offloaded one, in host memory) is drawn into
    a device tensor of its shape and copied over, so an offloaded model gets exactly
    the fully resident model's weights, one tensor at a time on the device."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + model.shard.rank)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif p.device == device:
            p.normal_(0.0, std, generator=gen)
        else:
            p.copy_(torch.empty_like(p, device=device).normal_(0.0, std, generator=gen))


@torch.no_grad()
def load_checkpoint(model: LlamaForCausalLM, path: str | Path) -> None:
    """Copy this rank's part of every tensor of a HF safetensors checkpoint into ``model``.

    Raises ``ValueError`` naming what is missing, unexpected or mis-shaped;
    the model is then only partly loaded and must not be used.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg, shard = model.config, model.shard
    if shard.vocab_real_rows < shard.vocab_rows:  # the last rank's rows past the vocabulary
        for name, p in params.items():
            if name.endswith(VOCAB):
                p[shard.vocab_real_rows :].zero_()
    loaded: set[str] = set()
    for hf_name, handle in _slices(Path(path)):
        if "rotary_emb" in hf_name:
            continue
        place = placement(cfg, shard, hf_name)
        if place.target not in params:
            raise ValueError(f"unexpected checkpoint tensor {hf_name!r}")
        tensor = _read(handle, place)
        target = params[place.target]
        dest = target.narrow(0, place.dest, place.length) if _fills_rows(place) else target
        if dest.shape != tensor.shape:
            full = tuple(handle.get_shape())
            raise ValueError(
                f"{hf_name}: checkpoint shape {full} gives {tuple(tensor.shape)} on rank "
                f"{shard.rank} of {shard.size}, not {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded.add(f"{place.target}:{place.dest}")
    expected = {f"{n}:{s}" for n, p in params.items() for s in _shard_starts(shard, n)}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight:0")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def placement(cfg: ModelConfig, shard: ModelShard, hf_name: str) -> Placement:
    """Where this rank puts (its slice of) the checkpoint tensor ``hf_name``."""
    d = cfg.head_dim
    for hf, (ours, index) in FUSED.items():
        if f".{hf}." in hf_name:
            sizes = _shard_sizes(shard, ours)
            starts = (
                [shard.q_head_start * d, shard.kv_head_start * d, shard.kv_head_start * d]
                if ours.endswith("qkv_proj")
                else [shard.intermediate_start] * 2
            )
            dest = sum(sizes[:index])
            return Placement(hf_name.replace(hf, ours), dest, 0, starts[index], sizes[index])
    for hf, part in ROW_PARALLEL.items():
        if f".{hf}." in hf_name:
            if part == "q":
                return Placement(hf_name, 0, 1, shard.q_head_start * d, shard.q_size)
            return Placement(hf_name, 0, 1, shard.intermediate_start, shard.intermediate_size)
    if hf_name.endswith(VOCAB):
        return Placement(hf_name, 0, 0, shard.vocab_start, shard.vocab_real_rows)
    return Placement(hf_name)


def _fills_rows(place: Placement) -> bool:
    """A slice of rows of the target (fused projections, vocabulary shards)."""
    return place.dim == 0


def _read(handle: Any, place: Placement) -> torch.Tensor:
    """Only the placement's range of the tensor, read from the file."""
    if place.dim is None:
        return handle[:]
    window = slice(place.start, place.start + place.length)
    return handle[window] if place.dim == 0 else handle[:, window]


def _shard_sizes(shard: ModelShard, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        return [shard.q_size, shard.kv_size, shard.kv_size]
    return [shard.intermediate_size, shard.intermediate_size]


def _shard_starts(shard: ModelShard, name: str) -> list[int]:
    for ours in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        if f".{ours}." in name:
            sizes = _shard_sizes(shard, ours)
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


def _slices(path: Path) -> Iterator[tuple[str, Any]]:
    """``(name, slice handle)`` of every tensor; a handle reads only what it is indexed by."""
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
                yield name, f.get_slice(name)
