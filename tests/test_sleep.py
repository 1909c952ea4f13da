"""Sleep mode on the CPU (host backend, fp32): sleep/wake round trips give the same
greedy tokens as before sleeping and as an engine without sleep mode; while asleep
the weights' and the KV's memfd pages are really given back; refusals change nothing."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vtensor import SamplingParams
from vtensor.engine import sleep as sleep_module
from vtensor.engine.config import EngineConfig
from vtensor.engine.sleep import EngineBusyError, EngineSleepingError, SleepModeError
from vtensor.memory.host import HostBackend

from .checkpoints import make_checkpoint, random_prompts

ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, chunk_size=4096)


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def workload(vocab: int) -> list[list[int]]:
    """Fresh prompts, two of which share a long prefix (the prefix cache holds chunks)."""
    prompts = random_prompts(random.randint(3, 6), vocab, lo=5, hi=60)
    shared = random_prompts(1, vocab, lo=40, hi=41)[0]
    return [*prompts, [*shared, 3, 4], [*shared, 5]]


@pytest.fixture(params=["random", "llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """The embedded random model (level 2 re-draws its seed's weights), or a tiny real
    checkpoint (level 2 reloads it; qwen2 has biases, tied embeddings in llama's)."""
    if request.param == "random":
        return None
    tie = request.param == "llama"
    make_checkpoint(tmp_path, request.param, tie_word_embeddings=tie)
    return str(tmp_path)


def test_round_trips_are_token_identical_and_give_memory_back(
    make_llm: Callable[..., Any], model_dir: str | None
) -> None:
    llm = make_llm(model_dir, enable_sleep_mode=True, **ENGINE)
    plain = make_llm(model_dir, **ENGINE)  # the same engine without sleep mode
    vocab = llm.engine.model_config.vocab_size
    prompts = workload(vocab)
    n = random.randint(4, 16)
    before = greedy(llm, prompts, n)
    assert before == greedy(plain, prompts, n)
    weights = llm.engine.weights
    kv_backend, w_backend = llm.engine.pool.backend, weights.region.backend
    assert isinstance(kv_backend, HostBackend) and isinstance(w_backend, HostBackend)
    ptrs = weights.data_ptrs(llm.engine.model)
    for level in [*random.sample([1, 2], 2), random.choice([1, 2])]:
        held = llm.memory_stats()
        assert held.weights_bytes == weights.region.nbytes > 0
        assert held.kv_held_bytes > held.kv_scratch_bytes  # KV to give back (cache, idle)
        assert w_backend.resident_bytes() > 0
        llm.sleep(level)
        assert llm.is_sleeping
        asleep = llm.memory_stats()
        assert asleep.weights_bytes == 0 and asleep.kv_held_bytes == asleep.kv_scratch_bytes
        assert w_backend.resident_bytes() == 0  # the memfd's pages were punched out
        assert kv_backend.resident_bytes() <= asleep.kv_scratch_bytes
        llm.engine.check_integrity()
        llm.wake_up()
        assert not llm.is_sleeping and weights.data_ptrs(llm.engine.model) == ptrs
        assert greedy(llm, prompts, n) == before, f"level {level}"


def test_generate_while_asleep_is_refused_and_queues_nothing(make_llm: Callable[..., Any]) -> None:
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    prompts = workload(llm.engine.model_config.vocab_size)
    before = greedy(llm, prompts, 6)
    llm.sleep(random.choice([1, 2]))
    with pytest.raises(EngineSleepingError, match="wake_up"):
        greedy(llm, prompts, 6)
    with pytest.raises(EngineSleepingError):
        llm.engine.add_request(prompts[0], SamplingParams(max_tokens=2))
    assert not llm.engine.requests and not llm.engine.has_unfinished()
    assert llm.is_sleeping
    llm.wake_up()
    assert greedy(llm, prompts, 6) == before


def test_sleep_with_unfinished_requests_is_refused_and_loses_nothing(
    make_llm: Callable[..., Any],
) -> None:
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    prompts = workload(llm.engine.model_config.vocab_size)
    want = greedy(llm, prompts, 8)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rids = [engine.add_request(p, params)[0] for p in prompts]
    for steps in range(random.randint(0, 5) + 1):  # waiting (0 steps) or running
        with pytest.raises(EngineBusyError):
            llm.sleep(random.choice([1, 2]))
        assert not llm.is_sleeping and engine.weights.resident
        engine.check_integrity()
        if steps:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert [engine.pop(r).output_ids for r in rids] == want


def test_double_sleep_wake_when_awake_and_bad_levels(make_llm: Callable[..., Any]) -> None:
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    prompts = workload(llm.engine.model_config.vocab_size)
    before = greedy(llm, prompts, 5)
    llm.wake_up()  # awake: nothing to do
    assert not llm.is_sleeping and greedy(llm, prompts, 5) == before
    for bad in (0, 3, -1, "1"):
        with pytest.raises(ValueError, match="level"):
            llm.sleep(bad)
    assert not llm.is_sleeping
    level = random.choice([1, 2])
    llm.sleep(level)
    with pytest.raises(EngineSleepingError, match=f"level {level}"):
        llm.sleep(3 - level)
    assert llm.engine.sleep_mode.level == level
    llm.wake_up()
    llm.wake_up()
    assert greedy(llm, prompts, 5) == before


def test_failed_reload_stays_asleep(
    make_llm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A level-2 wake whose reload fails (a checkpoint gone) stays asleep, holding
    nothing, and a later wake succeeds."""
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    prompts = workload(llm.engine.model_config.vocab_size)
    before = greedy(llm, prompts, 5)
    llm.sleep(2)
    real = sleep_module.fill_weights

    def broken(*_: Any) -> None:
        raise FileNotFoundError("the checkpoint is gone")

    monkeypatch.setattr(sleep_module, "fill_weights", broken)
    with pytest.raises(FileNotFoundError):
        llm.wake_up()
    assert llm.is_sleeping and llm.memory_stats().weights_bytes == 0
    llm.engine.check_integrity()
    monkeypatch.setattr(sleep_module, "fill_weights", real)
    llm.wake_up()
    assert greedy(llm, prompts, 5) == before


def test_sleep_mode_off_and_unsupported_configs(make_llm: Callable[..., Any]) -> None:
    llm = make_llm(**ENGINE)
    with pytest.raises(SleepModeError, match="enable_sleep_mode"):
        llm.sleep()
    assert not llm.is_sleeping
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        EngineConfig(enable_sleep_mode=True, cpu_offload_gb=1.0)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        EngineConfig(enable_sleep_mode=True, tensor_parallel_size=2)


def test_close_while_asleep_releases_everything(make_llm: Callable[..., Any]) -> None:
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    greedy(llm, workload(llm.engine.model_config.vocab_size), 3)
    llm.sleep(1)
    weights = llm.engine.weights
    assert weights.region.host.stats().live_bytes == weights.region.nbytes
    llm.close()
    assert weights.region.pool.closed and weights.region.host.stats().live_bytes == 0


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_before_any_request_and_repeated_cycles(
    make_llm: Callable[..., Any], level: int
) -> None:
    """The extremes: a sleep before the first request (only the scratch slot mapped),
    and many cycles in a row with no request between them."""
    llm = make_llm(enable_sleep_mode=True, **ENGINE)
    plain = make_llm(**ENGINE)
    for _ in range(random.randint(2, 6)):
        llm.sleep(level)
        assert llm.memory_stats().weights_bytes == 0
        llm.wake_up()
    prompts = workload(llm.engine.model_config.vocab_size)
    assert greedy(llm, prompts, 7) == greedy(plain, prompts, 7)
