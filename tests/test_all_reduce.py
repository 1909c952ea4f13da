"""The device all-reduce's choice (``--all-reduce``), on the CPU.

* the torch-free policy (``vtensor.distributed.all_reduce``): options, which
  messages the symmetric-memory one-shot takes, when it is unavailable;
* the tensor-level predicate and ``TPGroup.all_reduce``'s routing;
* the setup's agreement over a real gloo group: a step that fails on one rank
  makes both ranks fall back together, and no rank runs a later step alone;
* the engine with ``all_reduce="symm-mem"`` on gloo falls back to NCCL/gloo,
  says why once, and gives TP=1's tokens.

The symmetric-memory path itself needs two GPUs: ``test_all_reduce_gpu.py``.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vtensor.distributed.group as group_module
from tests.checkpoints import make_checkpoint, random_prompts
from vtensor import SamplingParams
from vtensor.cli import build_parser
from vtensor.cli_generate import engine_kwargs
from vtensor.distributed import LaunchSpec, TPGroup
from vtensor.distributed.all_reduce import (
    DEFAULT_SYMM_MAX_BYTES,
    AllReduceOptions,
    symm_accepts,
    symm_unavailable,
)
from vtensor.distributed.launch import connect_store, host_store, init_group, leave_group
from vtensor.distributed.procs import spawn_workers, stop_workers
from vtensor.distributed.symm_all_reduce import SmallAllReduce, SymmMemAllReduce, agreed_steps
from vtensor.engine.config import EngineConfig

POLICY = Path(__file__).parent.parent / "vtensor" / "distributed" / "all_reduce.py"


def test_the_policy_module_imports_no_torch() -> None:
    """Loaded alone (not through the package, whose ``__init__`` imports torch)."""
    code = (
        "import importlib.util, sys; "
        f"s = importlib.util.spec_from_file_location('policy', {str(POLICY)!r}); "
        "m = sys.modules['policy'] = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
        "assert 'torch' not in sys.modules, 'imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "custom"}, "unknown all-reduce backend 'custom'; known: nccl, symm-mem"),
        ({"symm_max_bytes": 0}, "positive multiple of 16, got 0"),
        ({"symm_max_bytes": -16}, "positive multiple of 16, got -16"),
        ({"symm_max_bytes": 4096 + 8}, "positive multiple of 16, got 4104"),
    ],
)
def test_bad_options_are_refused_with_the_reason(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AllReduceOptions(**kwargs)
    names = {"backend": "all_reduce", "symm_max_bytes": "all_reduce_symm_max_bytes"}
    with pytest.raises(ValueError, match=message):  # the engine's config says the same
        EngineConfig(**{names[k]: v for k, v in kwargs.items()})


def test_defaults_keep_nccl() -> None:
    config = EngineConfig()
    assert config.all_reduce == "nccl" and not config.all_reduce_options.wants_symm
    assert config.all_reduce_symm_max_bytes == DEFAULT_SYMM_MAX_BYTES == 4 << 20
    assert AllReduceOptions("symm-mem", 16).wants_symm  # the smallest legal buffer


def test_which_messages_the_one_shot_takes_at_the_extremes() -> None:
    limit = 16 * random.randrange(1, 1 << 16)
    assert symm_accepts(limit, "bfloat16", True, 0, limit)  # exactly the limit
    assert not symm_accepts(limit + 16, "bfloat16", True, 0, limit)
    assert symm_accepts(4, "float32", True, 0, limit)  # one fp32 element
    assert not symm_accepts(0, "float32", True, 0, limit)  # nothing to send: NCCL's no-op
    assert not symm_accepts(6, "bfloat16", True, 0, limit)  # 3 bf16: not 4-byte aligned
    assert not symm_accepts(64, "float16", True, 0, limit)  # the kernel has no fp16
    assert not symm_accepts(64, "int64", True, 0, limit)
    assert not symm_accepts(64, "bfloat16", False, 0, limit)  # strided
    assert not symm_accepts(64, "bfloat16", True, 8, limit)  # offset breaks 16-byte vectors
    assert symm_accepts(64, "bfloat16", True, 32, limit)


def test_symmetric_memory_is_unavailable_off_cuda_alone_across_nodes_or_without_the_op() -> None:
    assert "needs CUDA GPUs" in str(symm_unavailable("cpu", 2, True, True))
    assert "one rank" in str(symm_unavailable("cuda", 1, True, True))
    assert "several nodes" in str(symm_unavailable("cuda", 16, False, True))
    assert "one_shot_all_reduce_copy_out" in str(symm_unavailable("cuda", 2, True, False))
    assert symm_unavailable("cuda", 2, True, True) is None
    assert symm_unavailable("cuda", 8, True, True) is None


def test_the_tensor_predicate_reads_size_dtype_layout_and_device() -> None:
    """The decode step's messages: [batch, hidden] bf16 up to 4 MiB go; others not."""
    fast = SymmMemAllReduce(torch.empty(4 << 20, dtype=torch.uint8), "g", 4 << 20)
    hidden = random.choice([4096, 8192])
    for batch in (1, 16, 64, (4 << 20) // (2 * hidden)):
        assert fast.accepts(torch.empty(batch, hidden, dtype=torch.bfloat16))
    assert fast.accepts(torch.empty(3, 5, dtype=torch.float32))
    over = (4 << 20) // (2 * hidden) + 1
    assert not fast.accepts(torch.empty(over, hidden, dtype=torch.bfloat16))
    assert not fast.accepts(torch.empty(64, hidden, dtype=torch.float16))
    assert not fast.accepts(torch.empty(hidden, 8, dtype=torch.bfloat16).t())  # strided
    assert fast.accepts(torch.empty(9, 4, dtype=torch.float32)[1:])  # a 16-byte offset
    assert not fast.accepts(torch.empty(10, 2, dtype=torch.float32)[1:])  # 8 B offset
    assert not fast.accepts(torch.empty(0, hidden, dtype=torch.bfloat16))
    assert fast.accepts(torch.empty(1, 4, device="meta")) is False  # another device


class _Recorder(SmallAllReduce):
    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.seen: list[torch.Tensor] = []

    def accepts(self, x: torch.Tensor) -> bool:
        return self.accept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x.mul_(2)


def test_tp_group_routes_what_the_small_all_reduce_accepts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    nccl: list[torch.Tensor] = []
    monkeypatch.setattr(group_module.dist, "all_reduce", lambda x, group: nccl.append(x))
    x = torch.randn(4, 8)
    taken = _Recorder(accept=True)
    want = x * 2
    assert TPGroup(0, 2, small=taken).all_reduce(x) is x and torch.equal(x, want)
    assert taken.seen == [x] and nccl == []
    refused = _Recorder(accept=False)
    y = torch.randn(4, 8)
    assert TPGroup(1, 2, small=refused).all_reduce(y) is y
    assert refused.seen == [] and nccl == [y]
    z = torch.randn(3)  # a group of one: neither (the model runs as before)
    assert TPGroup(0, 1, small=_Recorder(True)).all_reduce(z) is z and nccl == [y]


def _agree_worker(spec: LaunchSpec, fail: tuple[int, int] | None, rank: int) -> None:
    """Rank ``rank``: run three setup steps (``fail`` = (rank, step) raises) and post
    which steps ran and what ``agreed_steps`` returned."""
    store = connect_store(spec)
    group = init_group(spec, store, rank, torch.device("cpu"))
    ran: list[int] = []

    def step(i: int) -> Any:
        def run() -> None:
            ran.append(i)
            if fail == (rank, i):
                raise OSError(f"no P2P on rank {rank}")

        return (f"step {i}", run)

    reason = agreed_steps(group, [step(0), step(1), step(2)])
    store.set(f"agree/{rank}", repr((ran, reason)))
    leave_group()


@pytest.mark.parametrize("fail", [None, (1, 1), (0, 0)])
def test_setup_steps_agree_across_ranks(fail: tuple[int, int] | None) -> None:
    store, spec = host_store(LaunchSpec(2))
    workers = spawn_workers(_agree_worker, [0, 1], (spec, fail))
    try:
        store.wait(["agree/0", "agree/1"])
        got = [eval(store.get(f"agree/{r}").decode()) for r in (0, 1)]
    finally:
        stop_workers(workers, 10.0)
    if fail is None:
        assert got == [([0, 1, 2], None), ([0, 1, 2], None)]
        return
    bad, step = fail
    for rank, (ran, reason) in enumerate(got):
        assert ran == list(range(step + 1)), f"rank {rank} ran {ran}: a step after the failure"
        if rank == bad:
            assert reason == f"step {step} failed on rank {bad}: OSError('no P2P on rank {bad}')"
        else:
            assert reason == f"step {step} failed on another rank"


def test_cli_flags_reach_the_engine_config() -> None:
    parser = build_parser()

    def config(*flags: str) -> EngineConfig:
        return EngineConfig(**engine_kwargs(parser.parse_args(["generate", *flags])))

    assert config().all_reduce == "nccl"
    c = config("--all-reduce", "symm-mem", "--all-reduce-symm-max-bytes", "1MiB")
    assert (c.all_reduce, c.all_reduce_symm_max_bytes) == ("symm-mem", 1 << 20)
    assert config("--all-reduce", "symm-mem", "--disable-custom-all-reduce").all_reduce == "nccl"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--all-reduce", "multimem"])
    with pytest.raises(ValueError, match="positive multiple of 16"):
        config("--all-reduce-symm-max-bytes", "1000")


def test_symm_mem_on_gloo_falls_back_once_and_matches_tp1(tmp_path: Path, make_llm, caplog) -> None:  # type: ignore[no-untyped-def]
    make_checkpoint(tmp_path, "llama", num_key_value_heads=2)
    prompts = random_prompts(3, 512)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = make_llm(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="vtensor.distributed"):
        tp = make_llm(str(tmp_path), tensor_parallel_size=2, all_reduce="symm-mem")
    why = [r.getMessage() for r in caplog.records if "symm-mem" in r.getMessage()]
    assert why == [
        "--all-reduce symm-mem: every all-reduce uses NCCL instead: needs CUDA GPUs "
        "(this group runs on cpu: gloo)"
    ]
    assert tp.engine.workers.group.small is None
    want, got = ref.generate(prompts, params), tp.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_one_node_from_the_flags_or_torchruns_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert LaunchSpec(2).one_node
    assert not LaunchSpec(4, nnodes=2, master_port=29500).one_node
    torchrun = LaunchSpec(4, master_port=29500, torchrun=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert torchrun.one_node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two
    assert not torchrun.one_node
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # an old launcher that does not say: not sure
    assert not torchrun.one_node
