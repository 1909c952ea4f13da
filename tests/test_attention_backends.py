"""Attention backends on the CPU: names map to classes, bad names and devices are
rejected with errors naming the backend, and the Triton backend (in Triton's
interpreter) gives the same engine output as the fp32 torch backend."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch

from vtensor import SamplingParams
from vtensor.cli import build_parser
from vtensor.cli import main as cli_main
from vtensor.engine import config as engine_config
from vtensor.engine.config import EngineConfig
from vtensor.models.attention_backends import (
    ATTENTION_BACKENDS,
    FlashAttention2,
    TorchAttention,
    TritonAttention,
    default_backend,
    select_backend,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it without a GPU


def test_each_name_maps_to_its_class() -> None:
    assert {
        "triton": TritonAttention, "fa2": FlashAttention2, "torch": TorchAttention
    } == ATTENTION_BACKENDS  # fmt: skip
    assert tuple(ATTENTION_BACKENDS) == engine_config.ATTENTION_BACKENDS  # the CLI's choices
    assert all(cls.name == name for name, cls in ATTENTION_BACKENDS.items())
    # Only the reference cannot be captured (it syncs on host ints); FA2 stores with our kernel.
    assert [c.supports_cuda_graphs for c in (TritonAttention, FlashAttention2, TorchAttention)] == [
        True, True, False,
    ]  # fmt: skip
    assert (FlashAttention2.store_impl, TorchAttention.store_impl) == ("triton", "torch")
    assert default_backend(CUDA) == "triton" and default_backend(CPU) == "torch"
    for name in (None, "auto", "torch"):
        assert select_backend(name, CPU, torch.float32, 32) is TorchAttention


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; known: triton, fa2"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_backend("flash", CPU, torch.float32, 32)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["generate", "--attention-backend", "flash"])


def test_fa2_is_rejected_off_cuda_and_for_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="'fa2' needs CUDA"):
        select_backend("fa2", CPU, torch.bfloat16, 64)
    # These checks come before any CUDA call, so they run on a machine without a GPU.
    with pytest.raises(ValueError, match=r"'fa2' needs bfloat16 or float16, got torch\.float32"):
        FlashAttention2.validate(CUDA, torch.float32, 64)
    for dim in (8, 96, 512):
        with pytest.raises(ValueError, match=r"'fa2' needs a power-of-two head_dim in \[16, 256\]"):
            FlashAttention2.validate(CUDA, torch.bfloat16, dim)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' on the CPU needs TRITON_INTERPRET=1"):
        select_backend("triton", CPU, torch.float32, 32)
    TritonAttention.validate(CUDA, torch.bfloat16, 128)  # CUDA needs no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("triton", CPU, torch.float32, 32) is TritonAttention


def test_engine_and_cli_reject_fa2_on_the_cpu(make_llm, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="'fa2' needs CUDA"):
        make_llm(attention_backend="fa2")
    argv = ["generate", "--attention-backend", "fa2", "--device", "cpu", "--max-tokens", "1"]
    assert cli_main(argv) == 2
    assert "error: attention backend 'fa2' needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate"], ["serve"], ["bench", "offline"]])
def test_every_engine_command_takes_the_option(command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--attention-backend", "torch"])
    assert args.attention_backend == "torch"
    assert build_parser().parse_args(command).attention_backend is None  # auto


def test_the_engine_builds_the_chosen_backend(make_llm) -> None:
    llm = make_llm()  # the CPU default: the fp32 reference, eager
    rt = llm.engine.runtime
    assert rt.attention_backend == "torch" and not rt.use_cuda_graphs
    assert type(llm.engine.runner.attn) is TorchAttention
    assert llm.engine.runner.attn.precompile(4, 0) == 0  # nothing to compile


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (set on CPU-only machines)")
def test_triton_and_torch_backends_give_the_same_engine_output(make_llm) -> None:
    """Greedy tokens and log-probs through chunked prefill, mixed steps and decodes."""
    kw: dict[str, Any] = dict(max_num_batched_tokens=16, dtype="float32")
    ref, tri = make_llm(attention_backend="torch", **kw), make_llm(attention_backend="triton", **kw)
    assert type(tri.engine.runner.attn) is TritonAttention
    seen: list[int] = []
    attend = tri.engine.runner.attn.attend  # the model's path (rope_store, then attend)

    def spy(layer, q, meta):  # type: ignore[no-untyped-def]
        if layer == 0 and not meta.is_decode:
            seen.append(meta.num_decode)
        return attend(layer, q, meta)

    tri.engine.runner.attn.attend = spy
    vocab = ref.engine.model_config.vocab_size
    prompts = [[random.randrange(4, vocab) for _ in range(n)] for n in (5, 23, 37)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    a, b = ref.generate(prompts, params), tri.generate(prompts, params)
    assert any(n > 0 for n in seen), f"no mixed step: {seen}"
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [d[t] for d, t in zip(x.outputs[0].logprobs, x.outputs[0].token_ids)]
        ly = [d[t] for d, t in zip(y.outputs[0].logprobs, y.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(lx), torch.tensor(ly), atol=1e-4, rtol=1e-4)
