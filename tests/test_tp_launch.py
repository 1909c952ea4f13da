"""The three ways to start the ranks, on the CPU: the engine spawns them (through the
CLI), two "nodes" meet through ``--nnodes/--node-rank/--master-*``, torchrun starts
them. Each must give TP=1's greedy output.

"Two nodes" here are two process trees on this machine that know each other only
through the rendezvous address: node 1 is a separate ``vtensor generate
--node-rank 1`` process, exactly what a second machine would run; node 0 is
this test's engine. Only the address would change across machines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint, random_prompts
from tests.conftest import assert_engine_balanced
from tests.server_harness import serve
from vtensor import LLM, SamplingParams
from vtensor.cli import main as cli_main
from vtensor.engine.warmup import warm_up

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vtensor.cli", *args]


def test_two_nodes_meet_through_the_rendezvous_flags(tmp_path: Path, make_llm) -> None:
    make_checkpoint(tmp_path, "qwen2", num_key_value_heads=2)
    port = free_port()
    rendezvous = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    node1 = subprocess.Popen(
        cli("generate", "--model", str(tmp_path), "--device", "cpu", "-tp", "2",
            "--node-rank", "1", *rendezvous),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        prompts = random_prompts(3, 512)
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in make_llm(str(tmp_path)).generate(prompts, params)]
        tp = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2, nnodes=2, node_rank=0,
                 master_port=port, debug_check_every=1)  # fmt: skip
        assert tp.engine.workers is not None and tp.engine.workers.local == []  # rank 1: node 1
        got = [o.outputs[0].token_ids for o in tp.generate(prompts, params)]
        assert_engine_balanced(tp.engine)
        tp.close()
        log, _ = node1.communicate(timeout=TIMEOUT_S)
        assert node1.returncode == 0, log
        assert "tensor-parallel rank 1: serving rank 0" in log
        assert got == want
    finally:
        if node1.poll() is None:
            node1.kill()


def _completions(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Completion:")]


def test_torchrun_and_spawn_give_the_single_process_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_checkpoint(tmp_path, "llama", num_key_value_heads=1)
    args = ["generate", "--model", str(tmp_path), "--device", "cpu", "--max-tokens", "12",
            "--prompt", "Hello, my name is", "--prompt", "The capital of France is"]  # fmt: skip
    assert cli_main(args) == 0
    want = _completions(capsys.readouterr().out)
    assert len(want) == 2
    assert cli_main([*args, "--tensor-parallel-size", "2"]) == 0  # spawn
    assert _completions(capsys.readouterr().out) == want
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "vtensor.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*torchrun, *args, "-tp", "2"], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert _completions(run.stdout) == want  # rank 0 prints; rank 1 only serves
    assert "tensor-parallel rank 1: serving rank 0" in run.stderr


def test_the_server_serves_a_tp2_engine(tmp_path: Path) -> None:
    """``vtensor serve -tp 2``'s engine behind the real server: warm-up (its kernel
    precompile goes to the worker too), plain and streamed completions, shutdown."""
    openai = pytest.importorskip("openai")
    make_checkpoint(tmp_path, "qwen3", num_key_value_heads=1)
    prompts = random_prompts(2, 512)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(str(tmp_path), device="cpu", max_model_len=256) as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    with serve(model=str(tmp_path), tensor_parallel_size=2) as served:
        served.runner.call_blocking(lambda: warm_up(served.engine))
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        extra = {"return_token_ids": True, "ignore_eos": True}
        kw = dict(model=client.models.list().data[0].id, max_tokens=8, temperature=0)
        got = client.completions.create(prompt=prompts, extra_body=extra, **kw)
        assert [c.token_ids for c in got.choices] == want
        stream = client.completions.create(prompt=prompts[0], stream=True, extra_body=extra, **kw)
        assert [t for event in stream for t in (event.choices[0].token_ids or [])] == want[0]
        served.idle_and_balanced()
