"""The engine gives memory back: after a burst the KV it holds returns to the floor (scratch
+ live + prefix cache + watermark at once, scratch + cache once the idle time passed), on
the host backend with a controllable clock; memory_stats adds up; outputs are unchanged."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from vtensor import SamplingParams
from vtensor.kvcache.idle_policy import ManualClock
from vtensor.memory.host import HostBackend

from .server_harness import serve


def prompts(n: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(1, 200) for _ in range(rng.randint(20, 90))] for _ in range(n)]


@pytest.mark.parametrize("caching", [False, True])
def test_after_a_burst_held_kv_returns_to_the_floor(
    make_llm: Callable[..., Any], caching: bool
) -> None:
    rng = random.Random()
    watermark = rng.randint(2, 6)
    budget = rng.randint(1, 6) * (64 << 10) if caching else None  # CPU chunks: 64 KiB
    llm = make_llm(
        dtype="float32",
        max_model_len=256,
        max_num_seqs=8,
        keep_idle_chunks=watermark,
        kv_idle_timeout_s=2.0,
        enable_prefix_caching=caching,
        prefix_cache_max_bytes=budget,
    )
    clock = ManualClock()
    llm.engine.set_clock(clock)
    backend = llm.engine.pool.backend
    assert isinstance(backend, HostBackend)
    chunk = llm.engine.pool.chunk_size
    params = SamplingParams(max_tokens=rng.randint(8, 24), temperature=0.0, ignore_eos=True)
    llm.generate(prompts(16, rng), params)
    m = llm.memory_stats()
    peak = llm.engine.pool.stats().released + m.kv_held_bytes // chunk
    # At once: the watermark binds at every release, and with no request left the pool
    # keeps nothing free. Held = scratch + cache + at most the watermark.
    floor = m.kv_scratch_bytes + m.kv_prefix_cached_bytes
    assert m.kv_live_bytes == 0 and m.kv_free_in_pool_bytes == 0
    assert 0 < m.kv_idle_bytes <= watermark * chunk  # kept for reuse, bounded
    assert m.kv_held_bytes <= floor + watermark * chunk
    assert backend.resident_bytes() <= m.kv_held_bytes  # the driver agrees (memfd pages)
    assert peak * chunk > floor + watermark * chunk, "the burst never held more than the floor"
    # Within the idle time nothing more goes; at the idle time, the idle chunks go too.
    clock.advance(1.99)
    assert llm.reclaim_idle() == 0 and llm.memory_stats().kv_idle_bytes == m.kv_idle_bytes
    clock.advance(0.01)
    assert llm.reclaim_idle() * chunk == m.kv_idle_bytes
    after = llm.memory_stats()
    assert after.kv_idle_bytes == 0 and after.kv_free_in_pool_bytes == 0
    assert after.kv_held_bytes == floor
    assert backend.resident_bytes() <= floor
    assert caching == (after.kv_prefix_cached_bytes > 0)  # the cache is not idle: it stays
    assert budget is None or 0 < after.kv_prefix_cached_bytes <= budget  # within its budget
    # The next burst maps on demand again and gives the same tokens.
    again = llm.generate(prompts(4, rng), params)
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in again)


def test_outputs_do_not_depend_on_reclamation(make_llm: Callable[..., Any]) -> None:
    """Greedy fp32 tokens with reclamation as eager as it gets (no idle chunk kept, no
    idle time) equal those of an engine that never reclaims idle slots."""
    rng = random.Random()
    batches = [prompts(rng.randint(3, 8), rng) for _ in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = []
    for keep, timeout in ((0, 0.0), (1 << 20, None)):
        llm = make_llm(dtype="float32", max_model_len=256, max_num_seqs=4,
                       keep_idle_chunks=keep, kv_idle_timeout_s=timeout)  # fmt: skip
        outs.append([[o.outputs[0].token_ids for o in llm.generate(b, params)] for b in batches])
        released = llm.engine.pool.stats().released
        assert (released > 0) == (keep == 0)
        llm.engine.close()
    assert outs[0] == outs[1]


def test_memory_stats_classes_add_up_while_running(make_llm: Callable[..., Any]) -> None:
    rng = random.Random()
    llm = make_llm(dtype="float32", max_model_len=256, max_num_seqs=4,
                   enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for p in prompts(6, rng):
        engine.add_request(p, params)
    for _ in range(rng.randint(3, 10)):
        engine.step()
    m = llm.memory_stats()
    pool = engine.pool.stats()
    chunk = engine.pool.chunk_size
    assert m.kv_held_bytes == pool.created * chunk
    assert m.kv_free_in_pool_bytes == pool.free * chunk
    running = [r for r in engine.scheduler.running]
    assert running
    assert m.kv_live_bytes == chunk * sum(engine.kv.mapped_chunks(r.rid) for r in running)
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in engine.model.state_dict().values()}  # fmt: skip
    assert m.weights_bytes == sum(weights.values()) > 0
    assert m.workspace_bytes is None  # the CPU has no allocator to ask
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                engine.pop(out.rid)


def test_server_gives_idle_memory_back_while_idle() -> None:
    """A real server (real clock): after a request, /metrics shows the idle chunks going
    back within the idle time (plus the idle loop's poll), with no request to trigger it."""
    import re

    import requests

    with serve(kv_idle_timeout_s=0.3, keep_idle_chunks=1 << 20, enable_prefix_caching=False) as s:

        def scrape() -> dict[str, float]:
            text = requests.get(s.url + "/metrics", timeout=30).text
            return {k: float(v) for k, v in re.findall(r"^(vtensor_\S+) (\S+)$", text, re.M)}

        body = {"prompt": "a b c d e f g h", "max_tokens": 16, "ignore_eos": True}
        t0 = time.monotonic()
        assert requests.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
        first = scrape()
        deadline = time.monotonic() + 10
        while (now := scrape())["vtensor_memory_kv_idle_bytes"] > 0:
            assert time.monotonic() < deadline, f"idle chunks never went back: {now}"
            time.sleep(0.05)
        assert time.monotonic() - t0 >= 0.3 or first["vtensor_memory_kv_idle_bytes"] == 0
        assert now["vtensor_memory_kv_held_bytes"] == now["vtensor_memory_kv_scratch_bytes"]
        assert now["vtensor_memory_kv_chunks_released"] > 0
        assert now["vtensor_memory_weights_bytes"] > 0
        s.idle_and_balanced()
