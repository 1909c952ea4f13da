"""Model shards without processes: which heads a rank holds, and what its loader reads.

A rank's shard is built with a ``TPGroup`` that has no process group (loading
never communicates) and compared with slices of HF's own full tensors, cut
here independently of ``loader.placement``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint
from vtensor.distributed import TPGroup
from vtensor.models import loader
from vtensor.models.config import ModelConfig
from vtensor.models.loader import build_model, load_checkpoint
from vtensor.models.parallel import ModelShard


@pytest.mark.parametrize(("heads", "kv", "size"), [(8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 1, 8),
                                                   (4, 4, 1), (6, 3, 3), (32, 8, 2)])  # fmt: skip
def test_every_query_head_finds_its_kv_head_on_its_rank(heads: int, kv: int, size: int) -> None:
    cfg = ModelConfig("LlamaForCausalLM", 100, heads * 16, 1, heads, kv, 16, 32 * size)
    group = heads // kv  # GQA: query head h reads KV head h // group
    held = []
    for rank in range(size):
        s = ModelShard.of(cfg, rank, size)
        assert s.num_heads * size == heads and s.num_kv_heads == max(1, kv // size)
        kv_heads = range(s.kv_head_start, s.kv_head_start + s.num_kv_heads)
        q_heads = range(s.q_head_start, s.q_head_start + s.num_heads)
        # Locally, query head j reads local KV head j // (local group): the same head.
        local_group = s.num_heads // s.num_kv_heads
        for j, h in enumerate(q_heads):
            assert h // group == kv_heads[j // local_group]
        held += list(kv_heads)
    assert sorted(set(held)) == list(range(kv))  # every KV head somewhere


class _SliceSpy:
    def __init__(self, handle: Any, counter: list[int]) -> None:
        self.handle, self.counter = handle, counter

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self.handle[index]
        self.counter[0] += t.numel()
        return t

    def get_shape(self) -> list[int]:
        return self.handle.get_shape()


class _FileSpy:
    """``safe_open`` that counts what is read and refuses whole-tensor reads."""

    def __init__(self, real: Any, counter: list[int]) -> None:
        self.real, self.counter = real, counter

    def __enter__(self) -> _FileSpy:
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)

    def keys(self) -> Any:
        return self.f.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"the loader read all of {name}")

    def get_slice(self, name: str) -> _SliceSpy:
        return _SliceSpy(self.f.get_slice(name), self.counter)


def expected_shard(full: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, size: int):
    """Our parameter names -> this rank's tensors, cut from HF's full state dict."""
    d, kv = cfg.head_dim, cfg.num_kv_heads
    hq, kvl = cfg.num_heads // size, max(1, kv // size)
    k0 = rank * kv // size if kv < size else rank * kvl
    q, k = slice(rank * hq * d, (rank + 1) * hq * d), slice(k0 * d, (k0 + kvl) * d)
    inter = cfg.intermediate_size // size
    m = slice(rank * inter, (rank + 1) * inter)
    rows = -(-cfg.vocab_size // size)
    out: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        p = name.rsplit(".", 2)[0]  # model.layers.i.self_attn / .mlp
        if "q_proj" in name:
            kind = name.rsplit(".", 1)[1]
            parts = [full[f"{p}.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{p}.qkv_proj.{kind}"] = torch.cat([parts[0][q], parts[1][k], parts[2][k]])
        elif "gate_proj" in name:
            out[f"{p}.gate_up_proj.weight"] = torch.cat([t[m], full[f"{p}.up_proj.weight"][m]])
        elif "o_proj" in name:
            out[name] = t[:, q]
        elif "down_proj" in name:
            out[name] = t[:, m]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            shard = torch.zeros(rows, t.shape[1])
            real = t[rank * rows : (rank + 1) * rows]
            shard[: len(real)] = real
            out[name] = shard
        elif not any(x in name for x in ("k_proj", "v_proj", "up_proj")):
            out[name] = t
    return out


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("qwen2", {"num_key_value_heads": 1, "vocab_size": 509}),
     ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
     ("qwen3", {"num_key_value_heads": 2})],
)  # fmt: skip
def test_each_rank_loads_only_its_slice(
    arch: str, overrides: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = make_checkpoint(tmp_path, arch, **overrides)
    full = {n: t.detach() for n, t in hf.state_dict().items()}
    cfg = ModelConfig.from_dir(tmp_path)
    counter = [0]
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _FileSpy(real_open(*a, **k), counter))
    for rank in range(2):
        counter[0] = 0
        model = build_model(cfg, torch.device("cpu"), torch.float32, 64, TPGroup(rank, 2))
        load_checkpoint(model, tmp_path)
        params = dict(model.named_parameters())  # a tied weight once
        want = expected_shard(full, cfg, rank, 2)
        assert set(params) <= set(want) | {"lm_head.weight"}
        for name, p in params.items():
            assert torch.equal(p, want[name]), f"rank {rank}: {name}"
        padding = model.shard.vocab_rows - model.shard.vocab_real_rows
        vocab_tables = 1 if cfg.tie_word_embeddings else 2
        held = sum(p.numel() for p in params.values()) - padding * vocab_tables * cfg.hidden_size
        assert counter[0] == held  # read exactly what the rank holds: no whole tensor
