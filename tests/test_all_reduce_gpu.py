"""``--all-reduce symm-mem`` on two GPUs: the symmetric-memory one-shot all-reduce.

* the group's own path (``init_group`` with symm-mem, then ``TPGroup.all_reduce``)
  against an independent reference: every rank's input gathered by NCCL and summed
  in fp32 (bf16: within one bf16 rounding of it; fp32: that sum exactly, since two
  ranks' sum is one rounding either way), bit-identical on both ranks; eager and
  inside a CUDA graph replayed on fresh inputs, mixed with messages that must go to
  NCCL (over the limit, float16) and do, with the right sums;
* the engine: TP=2 greedy fp32 tokens with symm-mem equal TP=1's (log-probs within
  1e-3, as ``test_tensor_parallel_gpu``), decode steps replayed from graphs, and the
  one-shot was used (its launch count); bf16 log-probs track TP=1 within that file's
  bounds.

Skipped unless two CUDA GPUs are visible. NVLink multicast stays off (the engine and
``init_group`` set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1; the one-shot kernel uses P2P loads only).
"""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.checkpoints import make_checkpoint, random_prompts
from tests.test_attention_backends_gpu import OVER, _count_replays, _walk
from tests.test_tensor_parallel_gpu import _closes_in_time
from vtensor import SamplingParams
from vtensor.distributed import LaunchSpec, TPGroup, multicast_off
from vtensor.distributed.all_reduce import AllReduceOptions
from vtensor.distributed.launch import connect_store, host_store, init_group, leave_group
from vtensor.distributed.procs import spawn_workers, stop_workers
from vtensor.distributed.symm_all_reduce import SymmMemAllReduce

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
LIMIT = 1 << 20  # the symmetric buffer: 1 MiB (a 70B batch-64 step's message exactly)


def _reference(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (NCCL all-gather), summed in fp32."""
    every = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(every, x.contiguous())
    return torch.stack(every).float().sum(0)


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.dtype == torch.float32:
        assert torch.equal(got, want), f"{what}: not the fp32 sum"
    else:  # one rounding of the exact sum to bf16/fp16
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-6, msg=what)
    peers = [torch.empty_like(got) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, got)
    assert all(torch.equal(p, peers[0]) for p in peers), f"{what}: ranks differ"


def _messages(seed: int, dev: torch.device) -> list[tuple[torch.Tensor, bool]]:
    """(message, goes through the one-shot?) at the limit's edges, random contents."""
    g = torch.Generator(device=dev).manual_seed(seed)
    hidden = 8192
    shapes = [((1, hidden), torch.bfloat16, True), ((64, hidden), torch.bfloat16, True),
              ((3, 4096), torch.float32, True), ((LIMIT // 4,), torch.float32, True),
              ((65, hidden), torch.bfloat16, False), ((16, hidden), torch.float16, False),
              ((7, 5), torch.float32, True)]  # fmt: skip
    return [(torch.randn(s, generator=g, device=dev).to(d), symm) for s, d, symm in shapes]


def _ops_rank(spec: LaunchSpec, seed: int, rank: int) -> None:
    multicast_off()
    store = connect_store(spec)
    try:
        dev = torch.device("cuda", rank)
        group = init_group(spec, store, rank, dev, AllReduceOptions("symm-mem", LIMIT))
        _ops_checks(group, dev, seed + rank)
        store.set(f"result/{rank}", "ok")
    except BaseException:
        store.set(f"result/{rank}", traceback.format_exc())
        raise
    finally:
        leave_group()


def _ops_checks(group: TPGroup, dev: torch.device, seed: int) -> None:
    fast = group.small
    assert isinstance(fast, SymmMemAllReduce), "symmetric memory did not set up"
    for i, (x, symm) in enumerate(_messages(seed, dev)):  # eager
        want, before = _reference(x), fast.launches
        assert group.all_reduce(x) is x
        assert fast.launches == before + symm, f"message {i}: wrong path"
        _check(x, want, f"eager message {i} {tuple(x.shape)} {x.dtype}")
    # A graph, as a decode step holds them: the same buffers, fresh contents each replay.
    static = [m for m, _ in _messages(seed, dev)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's threads
        for x in static:
            group.all_reduce(x)
    for replay in range(3):
        fresh = _messages(seed + 1000 * (replay + 1), dev)
        wants = [_reference(m) for m, _ in fresh]
        for x, (m, _) in zip(static, fresh):
            x.copy_(m)
        graph.replay()
        for i, (x, want) in enumerate(zip(static, wants)):
            _check(x, want, f"replay {replay}, message {i}")
    torch.cuda.synchronize()
    graph.reset()  # before the group goes: NCCL's destroy waits on graphs holding its ops


def test_symm_one_shot_sums_like_fp32_eager_and_in_graphs_on_two_gpus() -> None:
    store, spec = host_store(LaunchSpec(2, timeout_s=120))
    workers = spawn_workers(_ops_rank, [0, 1], (spec, random.randrange(1 << 30)))
    keys, results = ["result/0", "result/1"], {}
    try:  # a rank that failed posts why; its peer may then wait in a collective for good
        deadline = time.monotonic() + 180
        while len(results) < 2 and all(v == "ok" for v in results.values()):
            assert time.monotonic() < deadline, f"no result in 180 s: {results}"
            results |= {k: store.get(k).decode() for k in keys if store.check([k])}
            time.sleep(0.1)
    finally:
        stop_workers(workers, 30.0)
    assert [results.get(k) for k in keys] == ["ok", "ok"], "\n".join(map(str, results.values()))


def test_tp2_fp32_greedy_with_symm_mem_equals_tp1_on_two_gpus(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "llama", num_key_value_heads=2)
    kw: dict[str, Any] = dict(device="cuda", dtype="float32", max_num_seqs=8,
                              max_num_batched_tokens=32)  # fmt: skip
    ref = make_llm(str(tmp_path), **kw)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, all_reduce="symm-mem",
                  debug_check_every=7, **kw)  # fmt: skip
    fast = tp.engine.workers.group.small
    assert isinstance(fast, SymmMemAllReduce), "symmetric memory did not set up"
    assert tp.engine.runner.graphs is not None and tp.engine.runtime.async_scheduling
    replays, launched = _count_replays(tp), fast.launches
    assert launched > 0, "the decode graphs' warm-ups and captures used no one-shot"
    prompts = random_prompts(8, 512, lo=3, hi=80)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
    want, got = ref.generate(prompts, params), tp.generate(prompts, params)
    for i, (a, b) in enumerate(zip(want, got)):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids, f"prompt {i}"
        lx = torch.tensor([d[t] for d, t in zip(x.logprobs, x.token_ids)])
        ly = torch.tensor([d[t] for d, t in zip(y.logprobs, y.token_ids)])
        torch.testing.assert_close(ly, lx, atol=1e-3, rtol=1e-3)
    assert replays[0] > 20, f"only {replays[0]} graph replays: decode did not run in graphs"
    assert fast.launches > launched, "no all-reduce went through symmetric memory"
    _closes_in_time(tp)


def test_tp2_bf16_with_symm_mem_tracks_tp1_on_two_gpus(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "llama", dtype=torch.bfloat16, **OVER)
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=64)
    ref = make_llm(str(tmp_path), **kw)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, all_reduce="symm-mem", **kw)
    assert isinstance(tp.engine.workers.group.small, SymmMemAllReduce)
    prompts = random_prompts(6, 512, lo=20, hi=150)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    _walk(tp.generate(prompts, params), ref.generate(prompts, params), "symm-mem tp2 vs tp1")
