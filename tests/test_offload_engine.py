"""The engine with weight offload on the CPU (fp32, tiny checkpoints): greedy output is
token-identical to the same engine without offload, prefill and decode both stream
weights through the ring, the budget is checked with an error naming the smallest one
that works, and nothing leaks (the make_llm fixture checks the ring and host memory)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.cli import main as cli_main
from vtensor.cli_generate import parse_bytes
from vtensor.engine.config import EngineConfig
from vtensor.engine.offload_setup import ring_backend
from vtensor.models.embedded import embedded_config
from vtensor.models.loader import build_model, init_random, meta_model
from vtensor.models.offload import weights as offload_weights
from vtensor.models.offload.inventory import inventory
from vtensor.models.offload.policy import BudgetTooSmallError, OffloadRequest, plan_placement
from vtensor.models.offload.weights import OffloadedWeights

LAYERS = dict(num_hidden_layers=7)  # an odd count: a slot's last layer refills it at once


def smallest_budget(make_llm: Callable[..., Any], path: Path, **kw: Any) -> int:
    with pytest.raises(BudgetTooSmallError) as err:
        make_llm(str(path), gpu_memory_budget=1, **kw)
    return err.value.smallest_budget


def greedy(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_with_offload_is_token_identical(arch: str, tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, arch, **LAYERS)
    kw = dict(max_num_batched_tokens=40, max_num_seqs=4)  # chunked prefill, mixed batches
    prompts = random_prompts(4, 512, lo=3, hi=60)
    want = greedy(make_llm(str(tmp_path), **kw), prompts, 16)
    smallest = smallest_budget(make_llm, tmp_path, **kw)
    full = make_llm(str(tmp_path), gpu_memory_budget=10 * smallest, **kw).engine
    assert full.offload is None  # a budget that holds everything offloads nothing
    for budget, check in ((smallest, 1), (smallest + 300_000, 0)):
        llm = make_llm(str(tmp_path), gpu_memory_budget=budget, debug_check_every=check, **kw)
        off = llm.engine.offload
        assert off is not None and off.placement.gpu_bytes <= budget
        assert len(off.placement.order) > off.placement.ring_depth
        fills = off.stats().fills
        assert greedy(llm, prompts, 16) == want
        # Every forward pass (prefill chunks and decode steps) streamed its layers in.
        steps = llm.engine.stats().steps
        assert off.stats().fills - fills >= steps * (len(off.placement.order) - 2)


def test_cpu_offload_gb_saves_what_it_asks(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "llama", **LAYERS)
    prompts = random_prompts(3, 512)
    want = greedy(make_llm(str(tmp_path)), prompts, 16)
    ask = 0.0003  # GiB: ~315 KB of a ~1.3 MB model
    llm = make_llm(str(tmp_path), cpu_offload_gb=ask)
    p = llm.engine.offload.placement
    saved = p.fixed_bytes + p.offloaded_bytes + p.resident_layer_bytes - p.weights_gpu_bytes
    assert saved >= ask * 2**30
    assert greedy(llm, prompts, 16) == want
    with pytest.raises(ValueError, match=r"cpu_offload_gb 1\.00 cannot be met"):
        make_llm(str(tmp_path), cpu_offload_gb=1.0)


def test_async_scheduling_with_offload_matches(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "qwen2", **LAYERS)
    kw = dict(max_num_batched_tokens=24, max_num_seqs=3)
    prompts = random_prompts(4, 512, lo=10, hi=50)
    want = greedy(make_llm(str(tmp_path), **kw), prompts, 20)
    budget = smallest_budget(make_llm, tmp_path, **kw)
    llm = make_llm(str(tmp_path), gpu_memory_budget=budget, async_scheduling=True,
                   debug_check_every=1, **kw)  # fmt: skip
    assert greedy(llm, prompts, 20) == want


def test_the_placement_is_logged(tmp_path: Path, make_llm, caplog) -> None:
    make_checkpoint(tmp_path, "llama", **LAYERS)
    budget = smallest_budget(make_llm, tmp_path)
    with caplog.at_level(logging.INFO, logger="vtensor.engine"):
        llm = make_llm(str(tmp_path), gpu_memory_budget=budget)
    text = llm.engine.offload.placement.describe()
    assert text in caplog.text and "layers [" in text and "ring 2 x" in text


def test_config_refuses_bad_offload_settings() -> None:
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(cpu_offload_gb=1.0, gpu_memory_budget=10)
    with pytest.raises(ValueError, match="cpu_offload_gb must be >= 0"):
        EngineConfig(cpu_offload_gb=-1.0)
    with pytest.raises(ValueError, match="gpu_memory_budget must be positive"):
        EngineConfig(gpu_memory_budget=0)
    with pytest.raises(ValueError, match="offload_ring_depth must be >= 2"):
        EngineConfig(gpu_memory_budget=10, offload_ring_depth=1)
    with pytest.raises(ValueError, match="does not support tensor parallelism"):
        EngineConfig(cpu_offload_gb=1.0, tensor_parallel_size=2)


def test_a_failed_load_frees_the_host_memory(tmp_path: Path, monkeypatch, make_llm) -> None:
    """A checkpoint that fails to load after the host buffers exist leaks none of them."""
    make_checkpoint(tmp_path, "llama", **LAYERS)
    budget = smallest_budget(make_llm, tmp_path)
    made: list[Any] = []

    class Recorded(offload_weights.PinnedHostMemory):
        def __init__(self, pin: bool) -> None:
            super().__init__(pin)
            made.append(self)

    monkeypatch.setattr(offload_weights, "PinnedHostMemory", Recorded)
    shard = next(tmp_path.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a truncated checkpoint
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        make_llm(str(tmp_path), gpu_memory_budget=budget)
    assert made and all(m.closed and m.stats().live_bytes == 0 for m in made)


def test_cli_generate_with_a_budget(tmp_path: Path, make_llm, capsys) -> None:
    make_checkpoint(tmp_path, "llama", **LAYERS)
    budget = smallest_budget(make_llm, tmp_path, max_num_batched_tokens=64)
    args = ["generate", "--model", str(tmp_path), "--device", "cpu", "--max-tokens", "4",
            "--max-num-batched-tokens", "64", "--prompt", "Hello"]  # fmt: skip
    assert cli_main([*args, "--gpu-memory-budget", str(budget)]) == 0
    err = capsys.readouterr().err
    assert "offload (gpu_memory_budget" in err and "layers [" in err
    assert cli_main([*args, "--gpu-memory-budget", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert f"the smallest budget that works is {budget} bytes" in err
    assert cli_main([*args, "--cpu-offload-gb", "0.0003"]) == 0


def test_parse_bytes() -> None:
    assert parse_bytes("1024") == 1024 and parse_bytes("4e10") == 4 * 10**10
    assert parse_bytes("40GiB") == 40 << 30 and parse_bytes("40G") == 40 * 10**9
    assert parse_bytes("512 MiB") == 512 << 20 and parse_bytes("1.5kib") == 1536
    for bad in ("-3", "0", "ten", "5XB", ""):
        with pytest.raises(Exception, match=r"byte count|positive"):
            parse_bytes(bad)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_random_weights_drawn_into_host_memory_equal_the_resident_model(device: str) -> None:
    """``init_random`` draws each offloaded tensor where the resident model draws it (on
    the GPU, into a staging tensor copied to pinned memory): the same weights, bit for
    bit; ``bind`` then points each offloaded parameter into its ring slot."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    # Layers of ~13 MB: offloading half the model saves memory with 2 MiB VMM chunks too.
    cfg = replace(embedded_config(), num_layers=8, hidden_size=512, intermediate_size=2048)
    ref = build_model(cfg, dev, torch.float32, 64)
    init_random(ref, seed=3)
    model = meta_model(cfg, torch.float32, 64)
    layers, fixed = inventory(model, cfg.num_layers)
    backend = ring_backend(dev)
    ask = sum(sum(w.groups.values()) for w in layers) // 2
    req = OffloadRequest(cpu_offload_bytes=ask, slot_granularity=backend.chunk_size)
    off = OffloadedWeights.materialize(model, plan_placement(layers, fixed, 0, req), dev, backend)
    try:
        init_random(model, seed=3)
        want = dict(ref.named_parameters())
        hosted = {t.name for pk in off.packs.values() for t in pk.tensors}
        assert hosted, "nothing was offloaded"
        for name, p in model.named_parameters():
            assert p.device.type == ("cpu" if name in hosted else dev.type), name
            assert torch.equal(p.cpu(), want[name].cpu()), name
        off.bind(model)
        lo = off.ring.slot(0).data_ptr()
        for name, p in model.named_parameters():
            in_ring = lo <= p.data_ptr() < lo + off.ring.nbytes
            assert in_ring == (name in hosted) and p.device.type == dev.type, name
        assert not off.problems()
    finally:
        off.close()
    assert off.host.stats().live_bytes == 0 and off.ring.closed
