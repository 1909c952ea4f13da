"""Greedy generation must match HF ``transformers`` token for token (CPU, fp32).

Checkpoints are tiny random models saved by transformers' own classes and
read back by our loader; every test draws fresh weights and prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import ARCHS, hf_greedy, make_checkpoint, random_prompts
from vtensor import SamplingParams

MAX_NEW = 12


def check_against_hf(
    llm: Any, hf: Any, prompts: list[list[int]], max_new: int = MAX_NEW, atol: float = 2e-4
) -> None:
    params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0]
        ref = hf_greedy(hf, prompt, max_new)
        assert ours.token_ids == ref, f"prompt {prompt}"
        assert ours.finish_reason == "length"
        with torch.no_grad():  # logits: our raw log-probs of each token against HF's
            ids = torch.tensor([prompt + ref], device=hf.device)
            logits = hf(ids).logits[0, len(prompt) - 1 : -1].cpu()
        hf_logp = logits.float().log_softmax(-1).gather(1, torch.tensor(ref)[:, None])[:, 0]
        our_logp = torch.tensor([lp[t] for lp, t in zip(ours.logprobs, ref)])
        torch.testing.assert_close(our_logp, hf_logp, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_with_chunked_prefill(arch: str, tmp_path: Path, make_llm) -> None:
    hf = make_checkpoint(tmp_path, arch)
    llm = make_llm(str(tmp_path), max_num_batched_tokens=16)  # prompts of 3-40 tokens split
    check_against_hf(llm, hf, random_prompts(5, 512))


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"tie_word_embeddings": True, "rope_theta": 500000.0},
    ],
    ids=["llama3-rope", "linear-rope", "tied"],
)  # fmt: skip
def test_llama_variants_match_hf(overrides: dict[str, Any], tmp_path: Path, make_llm) -> None:
    hf = make_checkpoint(tmp_path, "llama", **overrides)
    llm = make_llm(str(tmp_path))
    check_against_hf(llm, hf, random_prompts(3, 512, lo=20, hi=60))


def test_preemption_and_recompute_mid_generation_match_hf(tmp_path: Path, make_llm) -> None:
    hf = make_checkpoint(tmp_path, "qwen3")
    # 2 layers x 2 kv heads x 16 dims x 2 x fp32 = 512 B/token: 8 tokens per 4 KiB chunk.
    # Admission lets two 30-40 token prompts in (5 chunks each, of 16); growing by 30
    # tokens each needs 8 more chunks than are left, so the newer is preempted.
    llm = make_llm(str(tmp_path), chunk_size=4096, kv_cache_bytes=16 * 4096, max_num_seqs=4)
    prompts = random_prompts(4, 512, lo=30, hi=40)
    check_against_hf(llm, hf, prompts, max_new=30)
    assert llm.engine.stats().preemptions > 0


def test_loader_rejects_incomplete_and_foreign_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from vtensor.engine.config import EngineConfig
    from vtensor.engine.llm_engine import LLMEngine

    make_checkpoint(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
    cfg = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"no config\.json in"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nowhere")))


def _shard_elsewhere(model_dir: Path, name_of: Any) -> None:
    """Move one shard out of ``model_dir`` and point the index's weight_map at it."""
    import json

    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    moved = name_of(model_dir, shard)
    Path(moved if Path(moved).is_absolute() else model_dir / moved).parent.mkdir(
        parents=True, exist_ok=True
    )
    (model_dir / shard).rename(moved if Path(moved).is_absolute() else model_dir / moved)
    index["weight_map"] = {k: (moved if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name_of",
    [
        lambda d, s: f"../{s}",  # next to the model directory
        lambda d, s: f"sub/../../{s}",  # out through a subfolder
        lambda d, s: str(d.parent / f"abs-{s}"),  # an absolute path
    ],
)
def test_loader_refuses_shards_outside_the_model_directory(tmp_path: Path, name_of: Any) -> None:
    """A weight_map entry is a file name inside the checkpoint, nothing else (issue 18)."""
    from vtensor.engine.config import EngineConfig
    from vtensor.engine.llm_engine import LLMEngine

    model_dir = tmp_path / "model"
    make_checkpoint(model_dir, "qwen2")  # sharded, with an index
    _shard_elsewhere(model_dir, name_of)
    with pytest.raises(ValueError, match="outside the model directory"):
        LLMEngine(EngineConfig(model=str(model_dir)))


def test_loader_follows_links_inside_the_model_directory(tmp_path: Path, make_llm) -> None:
    """The HF cache's snapshot folders link each file to a blob elsewhere: a shard name
    inside the directory is loaded wherever its link points."""
    model_dir = tmp_path / "snapshot"
    hf = make_checkpoint(model_dir, "qwen2")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in model_dir.glob("*.safetensors"):
        target = blobs / shard.name
        shard.rename(target)
        shard.symlink_to(target)
    check_against_hf(make_llm(str(model_dir)), hf, random_prompts(2, 512), max_new=4)
