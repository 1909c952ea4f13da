"""The heterogeneous mapping benchmark's machinery on the CPU: the arena's remaps move
exactly each slot's coldest chunks between the two pools and leave the rest untouched,
a timed decode point reports the bytes it read from each, and the derived numbers
(slowdown, swap-in, break-even) against a hand computation. The GPU run is
``benchmarks/hetero_h100.sh``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from vtensor.bench.hetero_decode import Q_HEADS, HeteroArena, time_decode
from vtensor.bench.hetero_report import LLAMA_BYTES_PER_TOKEN, derive, report
from vtensor.kernels.splitk import DecodeWorkspace
from vtensor.kvcache import KVLayout
from vtensor.memory import ChunkPool
from vtensor.memory.host import HostBackend

from .conftest import assert_pool_clean

# 2 layers x 8 KV heads x 128 dims x K,V x bf16 = 8 KiB a token: 256 tokens a chunk.
LAYOUT = KVLayout(num_slots=3, max_tokens=1024, num_layers=2, num_kv_heads=8, head_dim=128)


@pytest.fixture
def arena() -> Iterator[HeteroArena]:
    dev_b, host_b = HostBackend(), HostBackend()
    dev, host = ChunkPool(dev_b, 16 * dev_b.chunk_size), ChunkPool(host_b, 16 * host_b.chunk_size)
    h = HeteroArena(LAYOUT, dev, host)
    yield h
    h.close()
    for pool in (dev, host):
        assert_pool_clean(pool)
        pool.close()
    dev_b.close()
    host_b.close()


def test_remaps_move_each_slots_coldest_chunks_and_leave_the_rest(arena: HeteroArena) -> None:
    assert arena.slot_chunks == 4 and arena.host_pool.stats().in_use == 0
    before = arena.arena.tensor.clone()
    arena.set_host_chunks(2)  # verify() inside: each slot's chunks 0-1 the host pool's
    assert arena.host_pool.stats().in_use == 6 and arena.dev_pool.stats().in_use == 6
    now = arena.arena.tensor
    assert torch.equal(now[:, 512:], before[:, 512:])  # device chunks: not touched
    assert not torch.equal(now[:, :512], before[:, :512])  # remapped: refilled
    assert now[:, :512].float().abs().sum() > 0 and torch.isfinite(now.float()).all()
    after = now.clone()
    arena.set_host_chunks(1)  # chunk 1 back to the device, chunk 0 stays on the host
    assert arena.host_pool.stats().in_use == 3 and arena.dev_pool.stats().in_use == 9
    assert torch.equal(arena.arena.tensor[:, :256], after[:, :256])
    assert [arena.vt.owner(i) is arena.host_pool for i in range(4)] == [True, False, False, False]
    arena.set_host_chunks(0)
    assert arena.host_pool.stats().in_use == 0


def test_a_decode_point_counts_what_it_reads_from_each_location(arena: HeteroArena) -> None:
    arena.set_host_chunks(1)
    ran: list[int] = []

    def once(calls: Sequence[Callable[[], object]]) -> float:  # the CPU has no CUDA graphs
        for call in calls:
            call()
        ran.append(len(calls))
        return 2.0

    ws = DecodeWorkspace(Q_HEADS, 128, 64, "cpu")
    d = time_decode(arena, batch=2, ctx=300, workspace=ws, timer=once)
    assert ran == [2]  # one call per layer: both layers (a replay reads >= 256 MiB at most)
    assert d.bytes_per_call == 2 * 300 * 4096 and d.host_bytes_per_call == 2 * 256 * 4096
    assert d.host_chunks == 1 and d.host_share == pytest.approx(1 / 2)
    assert d.gbs == pytest.approx(d.bytes_per_call / 2e6)


def test_derived_numbers_match_a_hand_computation() -> None:
    row = dict(batch=4, ctx=4096, calls_per_replay=2, bytes_per_call=4 * 4096 * 4096)
    base = {**row, "host_chunks": 0, "host_share": 0.0, "ms_per_call": 0.5, "gbs": 0.0}
    base["host_bytes_per_call"] = 0
    half = {**row, "host_chunks": 32, "host_share": 0.5, "ms_per_call": 2.5, "gbs": 0.0}
    half["host_bytes_per_call"] = 4 * 2048 * 4096
    (d,) = derive([base, half], pinned_gbs=50.0)
    assert d["slowdown"] == pytest.approx(5.0) and d["extra_ms_per_layer"] == pytest.approx(2.0)
    assert d["llama_step_extra_ms"] == pytest.approx(64.0)
    assert d["host_tokens"] == 4 * 2048
    swap_in = 4 * 2048 * LLAMA_BYTES_PER_TOKEN / 50e6  # ms at 50 GB/s
    assert d["swap_in_ms"] == pytest.approx(swap_in)
    assert d["breakeven_steps"] == pytest.approx(swap_in / 64.0)
    # The device half still takes 0.25 ms at the 0% rate: the host half took 2.25 ms.
    assert d["host_gbs_implied"] == pytest.approx(4 * 2048 * 4096 / 2.25e6)
    text = report({"decode": [base, half], "derived": [d]})
    assert "   5.00" in text and "swapin" in text
