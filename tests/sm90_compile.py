"""Compile a Triton kernel for the H100 (sm_90) without a GPU, with the engine's
specialization, and read back its global loads and stores (PTX) and cuobjdump's
resource line. Shared by ``tests/gemv_sm90.py`` and ``tests/silu_argmax_sm90.py``, run
in processes without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions
the compiler needs); ``TOOL`` is missing where this Triton has no NVIDIA backend tools."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TOOL = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_sm90(
    kernel: Any, constexprs: dict[str, Any], pointers: dict[str, str], num_warps: int
) -> dict[str, Any]:
    """Every pointer and every int but the ones not specialized on marked 16-divisible."""
    loose = set(getattr(kernel, "do_not_specialize", ()))
    sig = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in kernel.arg_names}
    aligned = [i for i, a in enumerate(kernel.arg_names) if a not in constexprs and a not in loose]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    stages = constexprs.get("STAGES", 1)
    options = {"num_warps": num_warps, "num_stages": stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(TOOL), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    return {
        "kernel": kernel.fn.__name__,
        "constexprs": constexprs,
        "loads": sorted(set(re.findall(r"ld\.global[\w.]*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global[\w.]*", ptx))),
        "usage": next(line.strip() for line in out.splitlines() if "REG:" in line),
    }
