"""Tensor parallelism on two GPUs (NCCL), against the engine without it (TP=1, one GPU).

* **fp32**: token-identical greedy output, log-probs within 1e-3 (each rank's GEMM
  covers half the columns and an all-reduce adds the halves: fp32 rounding only),
  with everything on: decode steps replayed from CUDA graphs that hold the
  all-reduces and the logits' all-gather, async scheduling (workers take the
  sampled tokens from rank 0's NCCL broadcast into their token tables), chunked
  prefill and mixed steps; KV heads split (2) and replicated (1).
* **bf16**: the walk and bounds of ``test_attention_backends_gpu``: while both pick
  the same token its log-prob differs by < 0.15 nats, and < 0.05 on average; a
  different token only at a near tie. Why they fit here: TP rounds each
  row-parallel sum's two bf16 halves, then their sum (vs one rounding), about an
  ulp per layer like a different attention kernel. On the CPU (gloo), TP=2 against
  TP=1 in bf16 on this model gave at most 0.063 nats and 0.016-0.020 on average
  over three fresh models.
* a worker killed mid-decode: the engine raises ``WorkerDiedError`` naming rank 1
  (NCCL's group is aborted so that no GPU wait outlives the worker). Last in the
  file: if a torch broke that path, NCCL's own timeout (60 s here) ends the process.

Skipped unless two CUDA GPUs are visible.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint, random_prompts
from tests.conftest import assert_engine_balanced
from tests.greedy_walk import assert_greedy_close
from tests.test_attention_backends_gpu import OVER, _walk, count_replays
from vtensor import SamplingParams
from vtensor.distributed import WorkerDiedError
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


@pytest.mark.parametrize(("arch", "kv_heads"), [("qwen3", 2), ("llama", 1)])
def test_tp2_fp32_greedy_equals_tp1_on_two_gpus(
    arch: str, kv_heads: int, tmp_path: Path, make_llm
) -> None:
    make_checkpoint(tmp_path, arch, num_key_value_heads=kv_heads)
    kw: dict[str, Any] = dict(device="cuda", dtype="float32", max_num_seqs=8,
                              max_num_batched_tokens=32)  # fmt: skip
    ref = make_llm(str(tmp_path), **kw)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, debug_check_every=7, **kw)
    rt = tp.engine.runtime
    assert rt.device == torch.device("cuda", 0) and rt.use_cuda_graphs and rt.async_scheduling
    assert tp.engine.runner.graphs is not None and tp.engine.model.shard.num_kv_heads == 1
    replays = count_replays(tp)
    prompts = random_prompts(8, 512, lo=3, hi=80)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    want, got = ref.generate(prompts, params), tp.generate(prompts, params)
    # Two ranks' partial sums all-reduced round differently: a near-tie may flip.
    assert_greedy_close(want, got, "tp=2 vs tp=1")
    assert replays[0] > 20, f"only {replays[0]} graph replays: decode did not run in graphs"
    _closes_in_time(tp)


def _closes_in_time(llm: Any, limit_s: float = 60.0) -> None:
    """``close`` returns: NCCL's destroy waits forever on any live graph that captured
    its collectives, so the engine must destroy its graphs first (it once did not)."""
    assert_engine_balanced(llm.engine)
    closer = threading.Thread(target=llm.close, daemon=True)
    closer.start()
    closer.join(limit_s)
    assert not closer.is_alive(), f"close() still waits after {limit_s:.0f} s"


def test_tp2_bf16_logprobs_track_tp1_on_two_gpus(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "llama", dtype=torch.bfloat16, **OVER)
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=64)
    ref = make_llm(str(tmp_path), **kw)
    tp = make_llm(str(tmp_path), tensor_parallel_size=2, **kw)
    prompts = random_prompts(6, 512, lo=20, hi=150)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    _walk(tp.generate(prompts, params), ref.generate(prompts, params), "tp2 vs tp1, bf16")


def test_a_worker_killed_mid_decode_fails_the_engine_on_gpus(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama")
    config = EngineConfig(model=str(tmp_path), device="cuda", dtype="float32", max_num_seqs=8,
                          tensor_parallel_size=2, distributed_timeout_s=60)  # fmt: skip
    engine = LLMEngine(config)
    try:
        engine.add_requests(random_prompts(4, 512), SamplingParams(max_tokens=300, ignore_eos=True))
        for _ in range(8):  # prefill, then decode steps from graphs
            engine.step()
        [worker] = engine.workers.local if engine.workers else []
        os.kill(worker.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker rank 1 was killed by SIGKILL"):
            for _ in range(250):
                engine.step()
        assert time.monotonic() - t0 < 30
    finally:
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 30, "close() waited on the dead worker"
