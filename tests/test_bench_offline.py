"""``vtensor bench offline`` pieces on the CPU (embedded tiny model): the decode window
holds its batch constant and counts the KV it really reads, the goal verdict, the KV
memory figures, and the HF peer's eager and compiled paths."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vtensor.bench import decode_table
from vtensor.bench.decode_table import (
    BatchChangedError,
    add_floor,
    decode_steps,
    goal_line,
    kv_bytes_per_token,
)
from vtensor.bench.hf_peer import hf_compiled, hf_eager_step_or_none
from vtensor.bench.kv_usage import kv_sample, summarize
from vtensor.cli import main as cli_main
from vtensor.engine.params import SamplingParams
from vtensor.engine.stats import EngineStats


def _engine(make_llm: Callable[..., Any], **kwargs: Any) -> Any:
    # A small token budget makes admission take several steps, as at batch 256 on the
    # H100: the first requests decode while the last ones still prefill.
    kwargs.setdefault("max_num_batched_tokens", 24)
    kwargs.setdefault("attention_backend", "torch")  # the Triton interpreter is slow here
    return make_llm(**kwargs).engine


def test_decode_window_holds_the_batch_and_counts_the_kv_read(make_llm) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(make_llm)
    batch, ctx, steps = 4, 16, 5
    row = decode_steps(engine, batch, ctx, steps)
    assert row["running_every_step"] == batch and row["warmup_steps"] > 2
    # The window opens after the warm-up: requests admitted first have decoded more.
    start = row["ctx_at_window_start_mean"]
    assert start > ctx
    rows = batch * (start + 1) + batch * (steps - 1) / 2  # c + 1 + k rows at step k
    assert row["kv_bytes_read"] == pytest.approx(rows * kv_bytes_per_token(engine))
    assert not engine.has_unfinished() and not engine.requests  # aborted and popped


def test_decode_window_fails_when_the_batch_changes(make_llm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(make_llm)
    fill, step, window_steps = decode_table._fill_batch, engine.step, []

    def fill_then_arm(*args: Any) -> int:
        n = fill(*args)
        window_steps.append(0)  # the window opens now
        return n

    def step_then_abort() -> Any:  # one request leaves during the window's second step
        out = step()
        if window_steps:
            window_steps[0] += 1
            if window_steps[0] == 2:
                engine.abort(engine.scheduler.running[-1].rid)
        return out

    monkeypatch.setattr(decode_table, "_fill_batch", fill_then_arm)
    monkeypatch.setattr(engine, "step", step_then_abort)
    with pytest.raises(BatchChangedError, match="timed step 1 ran 2 requests"):
        decode_steps(engine, 3, 16, 6)
    assert not engine.has_unfinished()


def test_decode_window_refuses_a_window_past_max_model_len(make_llm) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(make_llm, max_model_len=24)
    with pytest.raises(ValueError, match="max_model_len"):
        decode_steps(engine, 2, 16, 8)
    # Room for the window, but not after the warm-up the batch needs: caught before timing.
    with pytest.raises(ValueError, match="tokens left per request"):
        decode_steps(engine, 2, 16, 5)
    assert not engine.has_unfinished()


def test_decode_window_needs_an_idle_engine(make_llm) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(make_llm)
    [rid] = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        decode_steps(engine, 1, 8, 2)
    engine.abort(rid)
    engine.pop(rid)


def test_goal_verdict_covers_every_batch() -> None:
    def row(batch: int, step_ms: float) -> dict:
        return {"batch": batch, "step_ms": step_ms, "sync_step_ms": step_ms,
                "weight_bytes": 1e9, "kv_bytes_read": 0.0}  # fmt: skip

    rows = [row(1, 1.1), row(16, 1.3), row(64, 1.0)]
    goal = add_floor(rows, bandwidth=1000.0)  # floor: 1 ms
    assert goal["met"] is False and goal["worst_batch"] == 16
    assert "NOT MET (worst 1.30x, at batch 16)" in goal_line(goal)
    assert add_floor(rows[::2], 1000.0)["met"] is True
    assert "not measured" in goal_line(add_floor(rows, None))
    assert decode_table.GOAL_X_FLOOR == 1.2


def _stats(**kw: int) -> EngineStats:
    base = dict(running=2, waiting=0, preemptions=0, steps=1, step_s=1.0, mapper_wait_s=0.0,
                mapper_waits=0, kv_sync_s=0.0, unmap_fences=0, kv_fence_s=0.0, kv_hook_s=0.0,
                mapper_busy_s=0.0,
                live_kv_bytes=300,
                mapped_kv_bytes=5 * 100, idle_kv_bytes=3 * 100, surplus_kv_bytes=100,
                chunk_size=100, pool_in_use_chunks=9, pool_free_chunks=4,
                pool_capacity_chunks=20)  # fmt: skip
    return EngineStats(**{**base, **kw})


def test_kv_figures_count_surplus_and_everything_the_pool_holds() -> None:
    s = kv_sample(_stats())
    assert s.waste_bytes == 500 - 100 - 300  # surplus left out
    assert s.empty_bytes == 500 - 300  # surplus counted
    assert s.held_bytes == (9 + 4) * 100  # running, idle, scratch and the free list
    idle = _stats(running=0, live_kv_bytes=0, mapped_kv_bytes=0, surplus_kv_bytes=0,
                  pool_free_chunks=8)  # fmt: skip
    out = summarize([s, kv_sample(idle)], 100)
    assert out["empty_bytes_per_running_mean"] == 100 and out["waste_chunks_per_running_max"] == 0.5
    assert out["held_bytes_max"] == 1700 and out["kept_kv_bytes_max"] == 400  # idle + surplus
    parts = out["held_at_peak"]
    assert parts["free_in_pool"] == 800 and sum(parts.values()) == 1700


def test_cli_prints_memory_figures_and_the_goal(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
            "--decode-batches", "1,3", "--decode-ctx", "16", "--decode-steps", "3",
            "--device", "cpu", "--no-hf-peer", "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for header in ("output tok/s", "total tok/s", "mapped-empty/req MiB", "held MiB (max)",
                   "running", "KV MB/step", "HF eager ms", "HF compiled ms", "goal: "):  # fmt: skip
        assert header in printed
    data = json.loads(out.read_text())
    t = data["throughput"][0]
    assert t["held_bytes_max"] >= t["empty_bytes_per_running_max"] > 0
    assert [d["running_every_step"] for d in data["decode"]] == [1, 3]
    assert data["decode_goal"]["met"] is None  # no floor on the CPU


def test_hf_peer_eager_and_compiled_paths(make_llm) -> None:  # type: ignore[no-untyped-def]
    engine = make_llm().engine
    cfg, rt = engine.model_config, engine.runtime
    assert hf_eager_step_or_none(cfg, rt, 2, 8, 2) is not None
    # transformers compiles only on CUDA-like devices: on the CPU the child reports that.
    rec = hf_compiled(cfg, rt, 2, 8, 2, timeout_s=300)
    assert rec["status"] == "not compiled" and rec["compiled"] is False, rec
    assert hf_compiled(cfg, rt, 2, 8, 2, timeout_s=0.2)["status"] == "timeout"


def test_cli_compares_prefix_caching_on_a_shared_prefix(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--prefix-len: every prompt starts with one shared prefix; --compare-prefix-caching
    runs the workload with the cache off, then on, on one engine."""
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--num-prompts", "5", "--prefix-len", "130", "--input-len", "9",
            "--output-len", "3", "--compare-prefix-caching", "--max-num-seqs", "2",
            "--decode-batches", "1", "--decode-ctx", "8", "--decode-steps", "2",
            "--device", "cpu", "--attention-backend", "torch", "--no-hf-peer",
            "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "prefix caching, on against off" in printed and "on / off" in printed
    off, on = json.loads(out.read_text())["throughput"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["prefix_cache_hit_rate"] == 0
    # 64-token blocks (1 KiB per token, 64 KiB chunks): the 3 prompts admitted after the
    # first two (max_num_seqs=2) hit both whole blocks of the shared prefix.
    assert on["prefix_cache_hit_rate"] == pytest.approx(3 * 128 / (5 * 139))


def test_repeated_prefix_comparisons_alternate_the_order(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--compare-prefix-caching 2 runs off, on, on, off (ABBA: a drift over the runs
    favours neither), each from an empty cache, and sums the pairs up."""
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--num-prompts", "4", "--prefix-len", "130", "--input-len", "9",
            "--output-len", "2", "--compare-prefix-caching", "2", "--max-num-seqs", "2",
            "--decode-batches", "1", "--decode-ctx", "8", "--decode-steps", "2",
            "--device", "cpu", "--attention-backend", "torch", "--no-hf-peer",
            "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    rows = json.loads(out.read_text())["throughput"]
    assert [r["prefix_caching"] for r in rows] == [False, True, True, False]
    rates = [r["prefix_cache_hit_rate"] for r in rows]
    assert rates[0] == rates[3] == 0 and rates[1] == rates[2] > 0  # each from an empty cache
    printed = capsys.readouterr().out
    assert "130+9/2: on / off" in printed and "geometric mean of 2" in printed
