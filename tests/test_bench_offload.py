"""``vtensor bench offload`` on the CPU with a tiny checkpoint: its structure (budgets,
modes, floors, goals, JSON), and that its naive peers compute what the prefetcher
computes (a peer that skipped work would make the comparison meaningless)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.bench import offload_measure
from vtensor.cli import main as cli_main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("offload_bench")
    make_checkpoint(path, "llama", num_hidden_layers=7)
    return path


def test_bench_offload_structure(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "offload.json"
    args = ["bench", "offload", "--model", str(checkpoint), "--device", "cpu", "--quick",
            "--budgets", "100,50,1", "--json", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert text.count("goal:") == 2 and "refused" in text
    assert "prefill from an idle engine, a latency, not in the goal; worst" in text
    res = json.loads(out.read_text())
    bw = res["bandwidth"]
    assert bw["h2d_pinned_gbs"] > 0 and bw["h2d_pageable_gbs"] > 0
    full, half, tiny = res["budgets"]  # run from the largest budget down
    assert "smallest budget that works" in tiny["refused"]
    assert full["offloaded_bytes"] == 0 and half["offloaded_bytes"] > 0
    assert half["weights_gpu_bytes"] < full["weights_gpu_bytes"]
    assert half["budget_bytes"] < full["budget_bytes"]
    assert [d["batch"] for d in half["decode"]] == [1, 4]
    for d, ref in zip(half["decode"], full["decode"]):
        assert {"eager", "naive", "naive-pinned"} <= d.keys() and "naive" not in ref
        assert "graphs" not in d  # no CUDA graphs on the CPU
        assert d["compute_floor_ms"] == ref["eager"]  # the resident step, same batch
        copy = half["offloaded_bytes"] / (bw["h2d_pinned_gbs"] * 1e9) * 1e3
        assert d["copy_floor_ms"] == pytest.approx(copy)
        assert d["floor_ms"] == max(d["compute_floor_ms"], d["copy_floor_ms"])
        assert d["x_floor"] == pytest.approx(d["eager"] / d["floor_ms"])
        assert d["x_naive"] == pytest.approx(d["naive"] / d["eager"])
    p = half["prefill"]
    assert {"ours", "naive", "naive-pinned"} <= p.keys()
    assert p["compute_floor_ms"] == full["prefill"]["ours"]
    s = half["prefill_stream"]  # back to back: its floor is the resident stream's
    assert s["compute_floor_ms"] == full["prefill_stream"]["ours"] > 0
    assert s["x_floor"] == pytest.approx(s["ours"] / max(s["compute_floor_ms"], copy))
    assert half["prefill_traces"] == {"idle": {}, "stream": {}}  # copy timing: CUDA only
    g = res["goals"]
    assert isinstance(g["floor_met"], bool) and isinstance(g["naive_met"], bool)
    assert half["label"] in g["floor_worst"][1]
    judged = [f"{half['label']}, decode b1", f"{half['label']}, decode b4",
              f"{half['label']}, prefill stream"]  # fmt: skip
    xs = {w: x for x, w in [(d["x_floor"], f"{half['label']}, decode b{d['batch']}")
                            for d in half["decode"]] + [(s["x_floor"], judged[2])]}  # fmt: skip
    assert g["floor_worst"] == [max(xs.values()), max(xs, key=lambda w: xs[w])]
    assert g["idle_prefill_worst"] == [p["x_floor"], f"{half['label']}, prefill idle"]


def test_prefill_stream_prefills_whole_prompts_a_step(checkpoint: Path, make_llm) -> None:
    """The stream's steps each prefill whole prompts (budget 256: two of 128 a step);
    a budget that would split a prompt is refused."""
    llm = make_llm(str(checkpoint), max_num_batched_tokens=256)
    engine = llm.engine
    steps = engine.stats().steps
    assert offload_measure.prefill_stream_ms(engine, 128, 5, warm=False) > 0
    assert engine.stats().steps - steps == 3 and not engine.has_unfinished()
    with pytest.raises(ValueError, match="would not prefill in one step"):
        offload_measure.prefill_stream_ms(engine, 300, 2)


@pytest.mark.parametrize("peer", ["naive", "naive-pinned"])
def test_the_naive_peers_compute_the_same_tokens(checkpoint: Path, make_llm, peer: str) -> None:
    from vtensor.models.offload.policy import BudgetTooSmallError

    with pytest.raises(BudgetTooSmallError) as err:
        make_llm(str(checkpoint), gpu_memory_budget=1)
    llm = make_llm(str(checkpoint), gpu_memory_budget=err.value.smallest_budget)
    prompts = random_prompts(3, 512)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    off = llm.engine.offload
    fills = off.stats().fills
    with offload_measure.mode(llm.engine, peer):
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    # The peer copied on its own while the prefetcher idled; it then primed the ring.
    assert off.stats().fills == fills + off.placement.ring_depth
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want  # re-primed


def test_every_timed_prefill_computes_its_whole_prompt(checkpoint: Path, make_llm) -> None:
    """The prefix cache keeps earlier prompts: a bench that repeated a prompt (as the
    naive peers once repeated ours) would time a one-token prefill. Two rounds of each
    measure hit the cache for nothing, on an engine whose prefix caching is on."""
    llm = make_llm(str(checkpoint), max_model_len=512, max_num_batched_tokens=512)
    engine = llm.engine
    assert engine.prefix_caching_summary() and "off" not in engine.prefix_caching_summary()
    for _ in range(2):
        offload_measure.prefill_ms(engine, 300, 1)
        offload_measure.prefill_stream_ms(engine, 300, 2)
    assert engine.stats().prefix_cache_hits == 0
    # The control: the same prompt twice does hit (so the counter can move).
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    prompt = offload_measure.fresh_prompt(engine.model_config.vocab_size, 300)
    for _ in range(2):
        llm.generate([prompt], params)
    assert engine.stats().prefix_cache_hits > 0
