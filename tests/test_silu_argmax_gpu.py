"""SiLU·mul and the greedy argmax on the GPU: Llama shapes, ``torch.compile``'s kernel and
``torch.argmax`` as peers, CUDA-graph capture and replay, offsets past 2^31 elements,
and the engine's use of both (with the switch off as the reference).

Skipped with a reason on machines without a GPU; run on the H100.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.greedy_walk import assert_greedy_close
from vtensor import SamplingParams
from vtensor.engine import sampler as sampler_mod
from vtensor.kernels import switch
from vtensor.kernels.activation import silu_mul
from vtensor.kernels.argmax import ArgmaxConfig, _num_sms, _partials, argmax, choose_splits
from vtensor.models import fused

from .test_activation_kernel import UNIT, assert_one_rounding, make

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

INTER = [14336, 7168, 18944]  # Llama-3-8B, its TP-2 shard, Qwen2-7B (not a block multiple)
VOCABS = [128256, 152064, 32000]  # Llama-3, Qwen2, Llama-2


@pytest.mark.parametrize("inter", INTER)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_rounds_once_at_model_shapes(inter: int, dtype: torch.dtype) -> None:
    for t in (1, 16, 256, 1000):
        gate_up = make(t, inter, dtype).cuda()
        assert_one_rounding(silu_mul(gate_up), gate_up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul_agrees_with_torch_compile(dtype: torch.dtype) -> None:
    """The same operations as inductor's kernel (``activation.py``): expected bitwise
    equal; required: ≥ 99.9% equal, the rest within one unit."""
    for t in (1, 16, 256):
        gate_up = make(t, 14336, dtype).cuda()
        ours, compiled = silu_mul(gate_up), fused._silu_mul_compiled(gate_up)
        same = float((ours == compiled).float().mean())
        print(f"{dtype} T={t}: {same:.6f} of outputs bitwise equal to torch.compile's")
        unit = UNIT.get(dtype, 2.0**-22)
        diff = (ours.double() - compiled.double()).abs()
        assert bool((diff <= 2 * unit * compiled.double().abs()).all())
        assert same >= 0.999


def plant(logits: torch.Tensor, cfg: ArgmaxConfig) -> None:
    """Row b: a maximum tied at two indices around a split or block boundary of the real
    launch (or the row's ends), NaN rows, an all -inf row."""
    batch, vocab = logits.shape
    splits, per = choose_splits(batch, vocab, _num_sms(logits.device), cfg)
    edges = [0, vocab - 1] + [s * per * cfg.block + d for s in range(1, splits) for d in (-1, 0)]
    edges += [b * cfg.block + d for b in range(1, -(-vocab // cfg.block)) for d in (-1, 0)]
    for b in range(batch):
        i, j = sorted(random.sample(edges, 2))
        logits[b, [i, j]] = 1e4
    if batch > 2:
        logits[1, [vocab - 1, 7]] = float("nan")
        logits[2] = float("-inf")


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_argmax_equals_torch(vocab: int, dtype: torch.dtype) -> None:
    cfg = ArgmaxConfig()
    for batch in (1, 2, 16, 100, 256, 1024):
        x = torch.randn(batch, vocab, device="cuda").to(dtype)
        assert torch.equal(argmax(x), x.argmax(-1))
        plant(x, cfg)
        assert torch.equal(argmax(x), x.argmax(-1))
        ties = torch.randint(-8, 8, (batch, vocab), device="cuda").to(dtype)  # ties everywhere
        assert torch.equal(argmax(ties), ties.argmax(-1))


def test_cuda_graph_capture_and_replay() -> None:
    """Both kernels captured in one graph (first calls inside the capture: the argmax's
    partials are allocated from the graph's pool and kept), replayed on new inputs."""
    gate_up = torch.empty(16, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    logits = torch.empty(16, 128256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        silu_mul(gate_up.normal_())
        argmax(logits.normal_())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, tokens = silu_mul(gate_up), argmax(logits)
    captured = {k: v.data_ptr() for k, v in _partials.items()}
    for _ in range(3):
        gate_up.copy_(make(16, 14336, torch.bfloat16))
        logits.normal_()
        logits[3, 99_999] = 50.0
        graph.replay()
        torch.cuda.synchronize()
        assert_one_rounding(y, gate_up)
        assert torch.equal(tokens, logits.argmax(-1)) and int(tokens[3]) == 99_999
    assert {k: v.data_ptr() for k, v in _partials.items()} == captured


def test_offsets_past_2_31_elements() -> None:
    """gate_up [75000, 28672] (2.15e9 elements) and logits [16800, 128256] (2.15e9): the
    last rows are read and written at 64-bit offsets."""
    gate_up = torch.zeros(75_000, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    gate_up[-64:] = make(64, 14336, torch.bfloat16).cuda()
    y = silu_mul(gate_up)
    assert_one_rounding(y[-64:], gate_up[-64:])
    assert not y[:-64].any()
    del gate_up, y
    logits = torch.zeros(16_800, 128256, device="cuda", dtype=torch.bfloat16)
    logits[-32:].normal_()
    logits[-1, -1] = 1e4
    assert torch.equal(argmax(logits)[-32:], logits[-32:].argmax(-1))
    del logits
    torch.cuda.empty_cache()


def test_model_and_sampler_dispatch_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_silu, real_argmax = fused.activation.silu_mul, sampler_mod.argmax

    def spy_silu(*a: Any, **k: Any) -> torch.Tensor:
        calls.append("silu")
        return real_silu(*a, **k)

    def spy_argmax(*a: Any, **k: Any) -> torch.Tensor:
        calls.append("argmax")
        return real_argmax(*a, **k)

    monkeypatch.setattr(fused.activation, "silu_mul", spy_silu)
    monkeypatch.setattr(sampler_mod, "argmax", spy_argmax)
    gate_up, logits = make(4, 512, torch.bfloat16).cuda(), torch.randn(4, 1000, device="cuda")
    fused.silu_mul(gate_up)
    assert torch.equal(sampler_mod.greedy_argmax(logits), logits.argmax(-1))
    assert calls == ["silu", "argmax"]
    was = switch.silu_argmax_enabled()
    try:
        switch.set_silu_argmax_enabled(False)
        compiled = fused.silu_mul(gate_up)
        assert torch.equal(compiled, fused._silu_mul_compiled(gate_up))
        sampler_mod.greedy_argmax(logits)
        assert calls == ["silu", "argmax"]  # neither kernel called
    finally:
        switch.set_silu_argmax_enabled(was)


def _engine(tmp_path: Path, make_llm: Any, enabled: bool) -> Any:
    """An fp32 engine built (its graphs captured) with the switch as asked."""
    switch.set_silu_argmax_enabled(enabled)
    return make_llm(
        str(tmp_path), device="cuda", dtype="float32", max_num_seqs=8, enable_prefix_caching=False
    )


def test_engine_with_and_without_the_kernels(tmp_path: Path, make_llm: Any) -> None:
    """fp32 engines. With the kernels, the greedy fast path (our argmax: no logprobs
    asked) picks exactly the tokens torch's argmax picks on the logprobs path, in the
    same engine on the same batches (no prefix cache: the same steps again). And it
    walks with an engine built and run without them (the switch off)."""
    make_checkpoint(tmp_path, "llama")
    prompts = random_prompts(6, 512, lo=5, hi=60)
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    with_logprobs = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=1)
    was = switch.silu_argmax_enabled()
    try:
        llm = _engine(tmp_path, make_llm, True)
        fast, on = llm.generate(prompts, greedy), llm.generate(prompts, with_logprobs)
        assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in on]
        off = _engine(tmp_path, make_llm, False).generate(prompts, with_logprobs)
    finally:
        switch.set_silu_argmax_enabled(was)
    assert_greedy_close(on, off, "kernels on vs off")
