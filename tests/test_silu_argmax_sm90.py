"""SiLU·mul and the argmax as the H100 runs them, checked without a GPU: compiled for
sm_90 (``tests/silu_argmax_sm90.py``, in a process without ``TRITON_INTERPRET``), every
variant the engine uses moves its data in 16-byte vectors and keeps everything in
registers. The interpreter checks results, not this: a load split into 2-byte pieces
would still be right, at a fraction of the bandwidth these kernels exist for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_compiled_for_sm90_with_16_byte_vectors_and_no_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, without its warning
    run = subprocess.run(
        [sys.executable, "-m", "tests.silu_argmax_sm90"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    variants = json.loads(run.stdout)
    assert {v["kernel"] for v in variants} == {"_silu_mul_kernel", "_argmax_split_kernel"}
    for v in variants:
        name = f"{v['kernel']} {v['constexprs']}"
        assert v["loads"] == ["ld.global.v4.b32"], (name, v["loads"])
        if v["kernel"] == "_silu_mul_kernel":
            assert v["stores"] == ["st.global.v4.b32"], (name, v["stores"])
        counts = dict(re.findall(r"(STACK|LOCAL):(\d+)", v["usage"]))
        assert counts == {"STACK": "0", "LOCAL": "0"}, (name, v["usage"])
