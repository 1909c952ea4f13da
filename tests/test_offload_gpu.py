"""Weight offload on the GPU: pinned host weights, a copy stream, a VMM ring, CUDA
graphs that capture the copies. Greedy output equals the fully resident engine's
(fp32 and bf16, graphs and eager); deliberately slowed copies (a spin kernel on the
copy stream) delay compute and are never read stale, and without the wait the same
probe sees stale weights. Skipped without a GPU; run on the H100."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.models.offload import streams
from vtensor.models.offload.policy import BudgetTooSmallError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Layers big enough that a 2 MiB-chunk ring saves memory: ~12.6 MB of MLP (fp32) each.
SHAPE = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, num_hidden_layers=8)  # fmt: skip
KW: dict[str, Any] = dict(device="cuda", dtype="float32", max_num_seqs=8,
                         max_num_batched_tokens=256)  # fmt: skip


def smallest_budget(make_llm: Callable[..., Any], path: Path, **kw: Any) -> int:
    with pytest.raises(BudgetTooSmallError) as err:
        make_llm(str(path), gpu_memory_budget=1, **kw)
    return err.value.smallest_budget


def run(llm: Any, prompts: list[list[int]], n: int) -> tuple[list[list[int]], torch.Tensor]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    lps = torch.tensor([d[t] for o in outs for d, t in zip(o.logprobs, o.token_ids)])
    return [o.token_ids for o in outs], lps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_offload_equals_the_resident_engine(
    dtype: torch.dtype, tmp_path: Path, make_llm
) -> None:
    make_checkpoint(tmp_path, "qwen2", dtype=dtype, **SHAPE)  # qkv bias: in the attn group
    kw = {**KW, "dtype": str(dtype).removeprefix("torch.")}
    prompts = random_prompts(6, 512, lo=5, hi=200)
    # The reference runs in the same mode: eager and graph replay pick different GEMM
    # kernels (padded batch), which in bf16 may round a near-tie the other way.
    want_of = {
        e: run(make_llm(str(tmp_path), enforce_eager=e, **kw), prompts, 48) for e in (False, True)
    }
    smallest = smallest_budget(make_llm, tmp_path, **kw)
    for budget, eager in ((smallest, False), (smallest, True), (smallest + (24 << 20), False)):
        want, want_lp = want_of[eager]
        llm = make_llm(str(tmp_path), gpu_memory_budget=budget, enforce_eager=eager, **kw)
        engine = llm.engine
        assert engine.runtime.dtype == dtype
        off = engine.offload
        assert off is not None and off.host.stats().pinned
        assert len(off.placement.order) > off.placement.ring_depth
        assert (engine.runner.graphs is None) == eager
        got, got_lp = run(llm, prompts, 48)
        assert got == want, f"budget {budget}, eager={eager}"
        # The same kernels on the same bytes: equal up to nothing, or a kernel choice.
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=tol)


def _spin_cycles_for(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for at least ``seconds``.

    The spin counts SM clock cycles. Calibrated on an idle, down-clocked GPU it would
    run short once the clock boosts (seen on the H100: 18 ms for "40 ms"), so the GPU
    is kept busy first and the calibration runs at the boosted clock, the fastest."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1-0.2 s of load: the clock ramps up
    cycles = 50_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * seconds / (start.elapsed_time(end) / 1e3))


def _slow_copy(cycles: int) -> streams.CopyFn:
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        torch.cuda._sleep(cycles)  # on the copy stream: the copy lands this much later
        dst.copy_(src, non_blocking=True)

    return copy


@pytest.mark.parametrize("eager", [True, False])
def test_slowed_copies_delay_compute_and_are_never_stale(
    eager: bool, tmp_path: Path, make_llm, monkeypatch
) -> None:
    """Every copy waits ~5 ms behind a spin kernel on the copy stream (captured into the
    decode graphs too): the outputs still equal the resident engine's, and a decode
    step takes at least the copies' time (compute waited for them)."""
    make_checkpoint(tmp_path, "llama", **SHAPE)
    prompts = random_prompts(4, 512, lo=5, hi=100)
    want, _ = run(make_llm(str(tmp_path), **KW), prompts, 24)
    budget = smallest_budget(make_llm, tmp_path, **KW)
    delay = 0.005
    monkeypatch.setattr(streams, "default_copy", _slow_copy(_spin_cycles_for(delay)))
    llm = make_llm(str(tmp_path), gpu_memory_budget=budget, enforce_eager=eager, **KW)
    assert (llm.engine.runner.graphs is None) == eager
    got, _ = run(llm, prompts, 24)
    assert got == want
    m = len(llm.engine.offload.placement.order)
    engine = llm.engine
    engine.add_request(prompts[0], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # the prefill
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()  # one decode step (a graph replay unless eager)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 >= 0.8 * m * delay  # every layer's copy was waited for
    while engine.has_unfinished():
        engine.step()


def test_a_probe_after_each_wait_sees_fresh_weights_and_stale_ones_without_it(
    tmp_path: Path, make_llm, monkeypatch
) -> None:
    """On the compute stream, right after each layer's wait, checksum the layer's slot:
    with the wait every checksum is its own layer's; without it (the negative control)
    slowed copies leave layers reading the previous occupant of their slot."""
    make_checkpoint(tmp_path, "llama", **SHAPE)
    budget = smallest_budget(make_llm, tmp_path, **KW)
    monkeypatch.setattr(streams, "default_copy", _slow_copy(_spin_cycles_for(0.02)))
    llm = make_llm(str(tmp_path), gpu_memory_budget=budget, enforce_eager=True, **KW)
    off = llm.engine.offload
    pf = off.prefetcher
    want = {layer: int(buf.tensor.sum(dtype=torch.int64)) for layer, buf in off.buffers.items()}
    seen: list[tuple[int, torch.Tensor]] = []

    def probe(layer: int) -> None:
        n = off.buffers[layer].nbytes
        seen.append((layer, off.ring.slot(off._slot(layer))[:n].sum(dtype=torch.int64)))

    pf.on_ready = probe
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate(random_prompts(2, 512), params)
    torch.cuda.synchronize()
    assert len(seen) >= 4 * len(want)
    assert all(int(s) == want[layer] for layer, s in seen)
    seen.clear()
    pf.wait_enabled = False
    llm.generate(random_prompts(2, 512), params)
    torch.cuda.synchronize()
    pf.wait_enabled = True
    stale = {layer for layer, s in seen if int(s) != want[layer]}
    assert len(stale) >= 2, "without the wait, no layer read stale weights: the probe is blind"


def test_an_eager_pass_leaves_refills_in_flight_and_settle_orders_them(
    tmp_path: Path, make_llm, monkeypatch
) -> None:
    """Copies slowed by 50 ms each: right after an eager prefill, a checksum queued on
    the compute stream still sees slot 0's previous occupant (the pass did not wait for
    its refill: the negative control), while one queued after ``settle`` sees ``o_0``;
    the decode graphs that follow settle before replaying, so greedy output still
    equals the resident engine's."""
    make_checkpoint(tmp_path, "llama", **SHAPE)
    prompts = random_prompts(3, 512, lo=5, hi=60)
    want, _ = run(make_llm(str(tmp_path), **KW), prompts, 6)
    budget = smallest_budget(make_llm, tmp_path, **KW)
    monkeypatch.setattr(streams, "default_copy", _slow_copy(_spin_cycles_for(0.05)))
    llm = make_llm(str(tmp_path), gpu_memory_budget=budget, **KW)
    off, engine = llm.engine.offload, llm.engine
    pf = off.prefetcher
    order, depth = off.placement.order, off.placement.ring_depth
    assert len(order) > depth and engine.runner.graphs is not None
    slot0 = off.ring.slot(0)[: off.buffers[order[0]].nbytes]
    first = int(off.buffers[order[0]].tensor.sum(dtype=torch.int64))
    engine.add_request(prompts[0], SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    engine.step()  # the prefill (eager), its last copies queued behind 50 ms spins
    assert 0 in pf.in_flight  # slot 0 has a second layer (m > depth): o_0 was refilled
    early = slot0.sum(dtype=torch.int64)  # compute stream, no wait for the copy stream
    pf.settle()
    late = slot0.sum(dtype=torch.int64)
    assert int(late) == first
    assert int(early) != first, "the pass waited for its refills: nothing was in flight"
    assert pf.in_flight == frozenset()
    while engine.has_unfinished():
        engine.step()
    got, _ = run(llm, prompts, 6)  # eager prefills, then graph replays that settle first
    assert got == want
